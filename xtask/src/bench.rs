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

mod ab;
mod nginx;
mod placement;
mod plot;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use xshell::{Shell, cmd};

use crate::util::{
    existing, find_oha, nofile_to_raise, root, shell, status_kib, step, which, with_nofile,
};

const USAGE: &str = "\
usage: cargo xtask bench [--quick] [--only petra|klaus|placement] [--duration SECS] [--warmup SECS]
                         [--quiet-wait SECS] [--baseline REV [--rounds N]]

  --quick          a smoke run: 2 s per case after a 1 s warm-up, 3 startup runs
  --only SERVICE   measure only Petra direct or only Klaus end to end (and its nginx reference),
                   or only the placement cases (Klaus across a link, and under overload)
  --duration SECS  measured window per case (default 10)
  --warmup SECS    warm-up before each case, not measured (default 2)
  --quiet-wait SECS  before each case, wait up to this long for other processes' load to
                   pass (default 30; 0 never waits)
  --baseline REV   A/B: also build REV's petra and klaus (a git revision: 229de98, HEAD~3) in
                   a temporary worktree, run Klaus end to end at 64 connections for that pair
                   and the current pair in interleaved rounds, and check that the current
                   pair's median CPU per request is at most 1.10x the baseline's
  --rounds N       rounds of the A/B comparison, each pair once per round (default 3)

OTEL_* variables in the bench's environment are passed to every Petra and Klaus it starts
(nothing else is): with --baseline on an older revision, that measures the cost of exporting
traces (start a receiver first, such as `tracesink --quiet`).
";

/// The concurrency levels every keep-alive case runs at.
const CONNECTIONS: [usize; 3] = [1, 64, 512];

/// Connections of the churn, logging and HTTP/2 cases, and of the budget's comparisons.
const BUDGET_CONNECTIONS: usize = 64;

/// The performance budget (see BENCHMARKS.md).
mod budget {
    /// Server CPU per Klaus request, Klaus and Petra together, at 64 connections, on the
    /// machine the issue was written on.
    pub(super) const CPU_US_PER_KLAUS_REQUEST: f64 = 45.0;
    /// What the nginx pair spent per request on that machine. The budget line scales 45 µs
    /// by the nginx pair's figure in the same run over this one, so that it means the same
    /// on a slower or faster machine: at most 45/53 = 0.85 of the nginx pair's CPU time.
    pub(super) const NGINX_CPU_US_AT_BUDGET: f64 = 53.0;
    /// Klaus p99 at most this many times Petra-direct p99, at 64 connections.
    pub(super) const P99_RATIO: f64 = 2.0;
    /// Resident memory of an idle service.
    pub(super) const IDLE_RSS_MB: f64 = 10.0;
    /// CPU per Klaus request at most this many times a baseline revision's, A/B medians of
    /// one run (`--baseline`).
    pub(super) const AB_CPU_RATIO: f64 = 1.10;
    /// Resident memory of a service at 512 connections.
    pub(super) const LOADED_RSS_MB: f64 = 64.0;
    /// Process start to the first 200 from `/readyz`.
    pub(super) const STARTUP_MS: f64 = 50.0;
}

/// The task's options.
#[derive(Debug, Clone)]
struct Options {
    duration: Duration,
    warmup: Duration,
    startup_runs: usize,
    only: Option<String>,
    /// How long to wait before each case for other processes' load to pass.
    quiet_wait: Duration,
    /// The revision to compare Klaus with (`--baseline`), if any.
    baseline: Option<String>,
    /// Rounds of that comparison; each pair runs once per round.
    rounds: usize,
    /// Whether `--rounds` was given (it needs `--baseline`).
    rounds_given: bool,
    /// A smoke run (`--quick`): its placement plot is not written to `docs/`.
    quick: bool,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Self {
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            startup_runs: 7,
            only: None,
            quiet_wait: Duration::from_secs(30),
            baseline: None,
            rounds: 3,
            rounds_given: false,
            quick: false,
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => {
                    options.duration = Duration::from_secs(2);
                    options.warmup = Duration::from_secs(1);
                    options.startup_runs = 3;
                    options.quiet_wait = Duration::from_secs(5);
                    options.quick = true;
                }
                "--only" => {
                    let service = args
                        .next()
                        .context("--only needs petra, klaus or placement")?;
                    if !["petra", "klaus", "placement"].contains(&service.as_str()) {
                        bail!("--only takes petra, klaus or placement, not '{service}'\n\n{USAGE}");
                    }
                    options.only = Some(service.clone());
                }
                "--baseline" => {
                    let rev = args.next().context("--baseline needs a git revision")?;
                    if rev.is_empty() || rev.starts_with('-') {
                        bail!("--baseline needs a git revision, not '{rev}'\n\n{USAGE}");
                    }
                    options.baseline = Some(rev.clone());
                }
                "--rounds" => {
                    let value = args.next().context("--rounds needs a number")?;
                    options.rounds = value
                        .parse()
                        .ok()
                        .filter(|n| (1..=20).contains(n))
                        .with_context(|| {
                            format!("--rounds: '{value}' is not a number in 1..=20")
                        })?;
                    options.rounds_given = true;
                }
                "--duration" | "--warmup" | "--quiet-wait" => {
                    let value = args
                        .next()
                        .with_context(|| format!("{arg} needs seconds"))?;
                    let secs: f64 = value
                        .parse()
                        .with_context(|| format!("{arg}: '{value}' is not a number"))?;
                    if !(0.0..=600.0).contains(&secs) {
                        bail!("{arg}: {secs} is outside 0..=600 seconds");
                    }
                    let secs = Duration::from_secs_f64(secs);
                    match arg.as_str() {
                        "--duration" => options.duration = secs.max(Duration::from_millis(100)),
                        "--warmup" => options.warmup = secs.max(Duration::from_millis(100)),
                        _ => options.quiet_wait = secs,
                    }
                }
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown option '{other}'\n\n{USAGE}"),
            }
        }
        ab::check_options(&options)?;
        Ok(options)
    }

    fn measures(&self, service: &str) -> bool {
        self.only.as_deref().is_none_or(|only| only == service)
    }
}

/// Runs the benchmark; fails when a figure misses the budget.
pub(crate) fn bench(args: &[String]) -> anyhow::Result<()> {
    let started = Instant::now();
    let options = Options::parse(args)?;
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

/// The load generator and the reference server, installed when missing.
#[derive(Debug)]
struct Tools {
    oha: PathBuf,
    nginx: PathBuf,
    /// The file-descriptor limit to raise children to, when the inherited one is too low for
    /// 512 connections.
    nofile: Option<u64>,
}

impl Tools {
    fn find(sh: &Shell) -> anyhow::Result<Self> {
        let oha = find_oha(sh)?;
        let nginx = match which("nginx").or_else(|| existing(PathBuf::from("/usr/sbin/nginx"))) {
            Some(nginx) => nginx,
            None => {
                install_nginx(sh)?;
                which("nginx")
                    .or_else(|| existing(PathBuf::from("/usr/sbin/nginx")))
                    .context("nginx is still missing after installing nginx-light")?
            }
        };
        Ok(Self {
            oha,
            nginx,
            nofile: nofile_to_raise()?,
        })
    }

    /// A command that runs `program` with the raised file-descriptor limit, keeping its PID
    /// (the shell `exec`s it).
    fn command(&self, program: &Path) -> Command {
        with_nofile(program, self.nofile)
    }
}

fn install_nginx(sh: &Shell) -> anyhow::Result<()> {
    println!("nginx is missing: apt-get install -y nginx-light");
    let (program, prefix): (&str, &[&str]) = if is_root()? {
        ("apt-get", &[])
    } else {
        ("sudo", &["-n", "apt-get"])
    };
    let _env = sh.push_env("DEBIAN_FRONTEND", "noninteractive");
    let install = || cmd!(sh, "{program} {prefix...} install -y -q nginx-light").run();
    if install().is_err() {
        cmd!(sh, "{program} {prefix...} update -q").run()?;
        install()?;
    }
    Ok(())
}

fn is_root() -> anyhow::Result<bool> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().next())
        == Some("0"))
}

/// The machine the run is on, and how busy it was.
#[derive(Debug)]
struct Machine {
    cores: u64,
    cpu: String,
    kernel: String,
    date: String,
    load_before: String,
    load_after: String,
    oha: String,
    nginx: String,
    clk_tck: u64,
}

impl Machine {
    fn read(sh: &Shell, tools: &Tools) -> anyhow::Result<Self> {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let (oha, nginx) = (&tools.oha, &tools.nginx);
        let nginx_version = cmd!(sh, "{nginx} -v").quiet().ignore_stdout().output()?;
        Ok(Self {
            cores: cmd!(sh, "nproc").quiet().read()?.parse().context("nproc")?,
            cpu,
            kernel: cmd!(sh, "uname -sr").quiet().read()?,
            date: cmd!(sh, "date -u +%Y-%m-%dT%H:%MZ").quiet().read()?,
            load_before: load_average()?,
            load_after: String::new(),
            oha: cmd!(sh, "{oha} --version").quiet().read()?,
            nginx: String::from_utf8_lossy(&nginx_version.stderr)
                .trim()
                .trim_start_matches("nginx version: ")
                .to_owned(),
            clk_tck: cmd!(sh, "getconf CLK_TCK")
                .quiet()
                .read()?
                .parse()
                .context("getconf CLK_TCK")?,
        })
    }

    /// Whether the one-minute load average says other work competes for the cores.
    fn busy(&self) -> bool {
        let one_minute: f64 = self
            .load_before
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        one_minute > 0.5 * self.cores as f64
    }

    fn finish(mut self) -> anyhow::Result<Self> {
        self.load_after = load_average()?;
        Ok(self)
    }
}

fn load_average() -> anyhow::Result<String> {
    let loadavg = fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    Ok(loadavg
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// A process the task started. Dropping it kills it (an nginx master with its workers), so
/// nothing outlives the task, also when a step fails.
#[derive(Debug)]
struct Proc {
    name: &'static str,
    child: Child,
    nginx: bool,
    stderr: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the process's stderr when it has exited.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
            bail!("{} exited ({status}):\n{}", self.name, stderr.trim());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        if self.nginx {
            // SIGKILL on the master would orphan its workers; SIGTERM stops them all at once.
            let workers = children_of(pid);
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(10));
            }
            for worker in workers {
                if comm(worker).as_deref() == Some("nginx") {
                    let _ = Command::new("kill")
                        .args(["-KILL", &worker.to_string()])
                        .status();
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PIDs whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| {
            stat_fields(child).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(pid)
        })
        .collect()
}

fn comm(pid: u32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// The fields of `/proc/PID/stat` after the command name: state is [0], ppid [1], utime [11],
/// stime [12].
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// User plus system CPU time of `pid` (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let fields = stat_fields(pid).with_context(|| format!("reading /proc/{pid}/stat"))?;
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("/proc/{pid}/stat has no field {}", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Free loopback ports, all distinct (each listener is held until all are picked).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The status code of `GET path` on a plain-HTTP address, or `None` when it does not answer.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while head.len() < 12 {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    std::str::from_utf8(head.get(9..12)?).ok()?.parse().ok()
}

/// The environment of one service.
#[derive(Debug, Clone)]
struct ServiceEnv {
    name: &'static str,
    vars: Vec<(&'static str, String)>,
    admin: SocketAddr,
}

fn petra_env(name: &'static str, certs: &Path, log: &str) -> anyhow::Result<(ServiceEnv, u16)> {
    let ports = free_ports(2)?;
    let file = |p: &str| certs.join(p).display().to_string();
    let env = ServiceEnv {
        name,
        vars: vec![
            ("LISTEN_ADDR", loopback(ports[0]).to_string()),
            ("ADMIN_ADDR", loopback(ports[1]).to_string()),
            ("TLS_CERT_FILE", file("petra/tls.crt")),
            ("TLS_KEY_FILE", file("petra/tls.key")),
            ("TLS_CLIENT_CA_FILE", file("petra/ca.crt")),
            // As the manifests run it: Klaus's identity only.
            (
                "TLS_CLIENT_ALLOWED_NAMES",
                "spiffe://petra-klaus/ns/petra-klaus/sa/klaus".to_owned(),
            ),
            ("RUST_LOG", log.to_owned()),
        ],
        admin: loopback(ports[1]),
    };
    Ok((env, ports[0]))
}

fn klaus_env(
    name: &'static str,
    certs: &Path,
    petra_port: u16,
    tls_front: bool,
    log: &str,
) -> anyhow::Result<(ServiceEnv, u16)> {
    let ports = free_ports(2)?;
    let file = |p: &str| certs.join(p).display().to_string();
    let mut vars = vec![
        ("LISTEN_ADDR", loopback(ports[0]).to_string()),
        ("ADMIN_ADDR", loopback(ports[1]).to_string()),
        ("PETRA_URL", format!("https://127.0.0.1:{petra_port}")),
        ("PETRA_CA_FILE", file("klaus/ca.crt")),
        ("PETRA_CLIENT_CERT_FILE", file("klaus/tls.crt")),
        ("PETRA_CLIENT_KEY_FILE", file("klaus/tls.key")),
        ("RUST_LOG", log.to_owned()),
    ];
    if tls_front {
        // Petra's server certificate is valid for localhost and 127.0.0.1, which is all the
        // front needs here.
        vars.push(("TLS_CERT_FILE", file("petra/tls.crt")));
        vars.push(("TLS_KEY_FILE", file("petra/tls.key")));
    }
    let env = ServiceEnv {
        name,
        vars,
        admin: loopback(ports[1]),
    };
    Ok((env, ports[0]))
}

/// Starts a service with its log lines (stdout) thrown away and its stderr in
/// `target/bench/logs`, under a guard. `wrap` raises the open-files limit through a shell.
fn spawn_service(
    bin: &Path,
    env: &ServiceEnv,
    out: &Path,
    tools: Option<&Tools>,
) -> anyhow::Result<Proc> {
    let stderr = out.join(format!("logs/{}.stderr", env.name));
    let mut command = match tools {
        Some(tools) => tools.command(bin),
        None => Command::new(bin),
    };
    command
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        // Traces: OTEL_* set for the bench reach every Petra and Klaus it starts, so that the
        // cost of exporting can be measured against a baseline (BENCHMARKS.md says how).
        .envs(std::env::vars().filter(|(key, _)| key.starts_with("OTEL_")))
        .env("LOG_FORMAT", "json")
        .env("SHUTDOWN_DELAY_SECONDS", "0")
        .env("SHUTDOWN_TIMEOUT_SECONDS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&stderr).context("creating a log file")?);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Proc {
        name: env.name,
        child,
        nginx: false,
        stderr,
    })
}

/// Polls `/readyz` every millisecond until it answers 200; returns the time since `since`.
fn wait_ready(proc: &mut Proc, admin: SocketAddr, since: Instant) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(10);
    loop {
        if http_status(admin, "/readyz") == Some(200) {
            return Ok(since.elapsed());
        }
        proc.check_running()?;
        if Instant::now() > deadline {
            bail!("{} was not ready within 10 s", proc.name);
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Startup-to-ready of each service: the median (and all runs) in milliseconds.
type Startup = BTreeMap<&'static str, Vec<f64>>;

/// Starts each service `runs` times and times process start to the first 200 from `/readyz`.
fn startup(
    bins: &Binaries,
    certs: &Path,
    out: &Path,
    options: &Options,
) -> anyhow::Result<Startup> {
    let mut times = Startup::new();
    for run in 0..options.startup_runs {
        let (petra, petra_port) = petra_env("startup-petra", certs, "info")?;
        let (klaus, _) = klaus_env("startup-klaus", certs, petra_port, true, "info")?;
        for (service, bin, env) in [
            ("petra", &bins.petra, &petra),
            ("klaus", &bins.klaus, &klaus),
        ] {
            let since = Instant::now();
            let mut proc = spawn_service(bin, env, out, None)?;
            let ready = wait_ready(&mut proc, env.admin, since)?;
            drop(proc);
            let ms = ready.as_secs_f64() * 1000.0;
            times.entry(service).or_default().push(ms);
            if run == 0 {
                println!("    {service}: {ms:.1} ms");
            }
        }
    }
    for runs in times.values_mut() {
        runs.sort_by(f64::total_cmp);
    }
    Ok(times)
}

/// The median of sorted values: the middle one, or the mean of the two middle ones.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => sorted[n / 2],
        _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Processes whose CPU and memory are measured together under one name.
#[derive(Debug, Clone)]
struct Group {
    pids: Vec<u32>,
}

impl Group {
    fn cpu_ticks(&self) -> anyhow::Result<u64> {
        self.pids.iter().map(|&pid| cpu_ticks(pid)).sum()
    }

    fn rss_kib(&self, key: &str) -> u64 {
        self.pids
            .iter()
            .filter_map(|&pid| status_kib(pid, key))
            .sum()
    }
}

/// Everything under test, running: Petra and Klaus (at `info` and at `warn`) and the nginx
/// pair. Dropping it stops them all.
#[derive(Debug)]
struct Stack {
    groups: BTreeMap<&'static str, Group>,
    urls: BTreeMap<&'static str, String>,
    procs: Vec<Proc>,
}

/// The group names: our services by role and log level, and the two nginx instances.
const PETRA: &str = "petra";
const KLAUS_HTTPS: &str = "klaus-https";
const KLAUS_HTTP: &str = "klaus-http";
const PETRA_WARN: &str = "petra-warn";
const KLAUS_WARN: &str = "klaus-https-warn";
const NGINX_PETRA: &str = "nginx-petra";
const NGINX_KLAUS: &str = "nginx-klaus";
const NGINX_KLAUS_HTTPS: &str = "nginx-klaus-https";
const NGINX_KLAUS_HTTP: &str = "nginx-klaus-http";

impl Stack {
    fn start(bins: &Binaries, tools: &Tools, certs: &Path, out: &Path) -> anyhow::Result<Self> {
        let mut stack = Self {
            groups: BTreeMap::new(),
            urls: BTreeMap::new(),
            procs: Vec::new(),
        };
        let (petra, petra_port) = petra_env(PETRA, certs, "info")?;
        let (petra_warn, petra_warn_port) = petra_env(PETRA_WARN, certs, "warn")?;
        for (env, port) in [(petra, petra_port), (petra_warn, petra_warn_port)] {
            stack.start_service(&bins.petra, &env, out, tools)?;
            stack
                .urls
                .insert(env.name, format!("https://127.0.0.1:{port}/"));
        }
        for (name, petra_port, tls, log) in [
            (KLAUS_HTTPS, petra_port, true, "info"),
            (KLAUS_HTTP, petra_port, false, "info"),
            (KLAUS_WARN, petra_warn_port, true, "warn"),
        ] {
            let (env, port) = klaus_env(name, certs, petra_port, tls, log)?;
            stack.start_service(&bins.klaus, &env, out, tools)?;
            let scheme = if tls { "https" } else { "http" };
            stack
                .urls
                .insert(name, format!("{scheme}://127.0.0.1:{port}/"));
        }
        stack.start_nginx(tools, certs, out)?;
        stack.sanity_check(tools, certs)?;
        Ok(stack)
    }

    fn start_service(
        &mut self,
        bin: &Path,
        env: &ServiceEnv,
        out: &Path,
        tools: &Tools,
    ) -> anyhow::Result<()> {
        let since = Instant::now();
        let mut proc = spawn_service(bin, env, out, Some(tools))?;
        wait_ready(&mut proc, env.admin, since)?;
        self.groups.insert(
            env.name,
            Group {
                pids: vec![proc.pid()],
            },
        );
        self.procs.push(proc);
        Ok(())
    }

    /// Starts nginx as Petra and nginx as Klaus (an HTTPS and a plain-HTTP listener, both
    /// proxying to nginx-Petra over HTTPS with mutual TLS and upstream keep-alive).
    fn start_nginx(&mut self, tools: &Tools, certs: &Path, out: &Path) -> anyhow::Result<()> {
        let ports = free_ports(3)?;
        let (petra_port, https_port, http_port) = (ports[0], ports[1], ports[2]);
        let file = |p: &str| certs.join(p).display().to_string();
        let petra_conf = nginx::PETRA_CONF
            .replace("@PORT@", &petra_port.to_string())
            .replace("@CERT@", &file("petra/tls.crt"))
            .replace("@KEY@", &file("petra/tls.key"))
            .replace("@CLIENT_CA@", &file("petra/ca.crt"));
        let klaus_conf = nginx::KLAUS_CONF
            .replace("@HTTPS_PORT@", &https_port.to_string())
            .replace("@HTTP_PORT@", &http_port.to_string())
            .replace("@PETRA_PORT@", &petra_port.to_string())
            .replace("@CERT@", &file("petra/tls.crt"))
            .replace("@KEY@", &file("petra/tls.key"))
            .replace("@CLIENT_CERT@", &file("klaus/tls.crt"))
            .replace("@CLIENT_KEY@", &file("klaus/tls.key"))
            .replace("@CA@", &file("klaus/ca.crt"));
        for (name, conf, port) in [
            (NGINX_PETRA, petra_conf, petra_port),
            (NGINX_KLAUS, klaus_conf, http_port),
        ] {
            let prefix = out.join(name);
            if prefix.exists() {
                fs::remove_dir_all(&prefix).context("removing an old nginx prefix")?;
            }
            fs::create_dir_all(&prefix).context("creating an nginx prefix")?;
            let conf = conf.replace("@PREFIX@", &prefix.display().to_string());
            let conf_path = prefix.join("nginx.conf");
            fs::write(&conf_path, conf).context("writing nginx.conf")?;
            let stderr = out.join(format!("logs/{name}.stderr"));
            let child = tools
                .command(&tools.nginx)
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf_path)
                .arg("-e")
                .arg(&stderr)
                .env_clear()
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&stderr).context("creating a log file")?)
                .spawn()
                .context("starting nginx")?;
            let mut proc = Proc {
                name,
                child,
                nginx: true,
                stderr,
            };
            // The master binds before it forks; ready means both workers are up too.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                proc.check_running()?;
                let workers = children_of(proc.pid());
                if workers.len() >= 2
                    && TcpStream::connect_timeout(&loopback(port), Duration::from_millis(200))
                        .is_ok()
                {
                    let mut pids = vec![proc.pid()];
                    pids.extend(workers);
                    self.groups.insert(name, Group { pids });
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} did not start within 10 s");
                }
                thread::sleep(Duration::from_millis(5));
            }
            self.procs.push(proc);
        }
        self.urls
            .insert(NGINX_PETRA, format!("https://127.0.0.1:{petra_port}/"));
        self.urls.insert(
            NGINX_KLAUS_HTTPS,
            format!("https://127.0.0.1:{https_port}/"),
        );
        self.urls
            .insert(NGINX_KLAUS_HTTP, format!("http://127.0.0.1:{http_port}/"));
        Ok(())
    }

    /// One request to each target, checking the body: a benchmark of wrong answers is worthless.
    fn sanity_check(&self, tools: &Tools, certs: &Path) -> anyhow::Result<()> {
        for (target, url) in &self.urls {
            let want = if target.contains("petra") {
                "hello"
            } else {
                "hello world"
            };
            let output = tools
                .command(&tools.oha)
                .args(["--debug", "--cacert"])
                .arg(certs.join("ca.crt"))
                .arg("--cert")
                .arg(certs.join("klaus/tls.crt"))
                .arg("--key")
                .arg(certs.join("klaus/tls.key"))
                .arg(url)
                .output()
                .context("running oha --debug")?;
            let text = String::from_utf8_lossy(&output.stdout);
            let body_ok = text.contains("status: 200")
                && (text.contains(&format!("\"{want}\""))
                    || text.contains(&format!("b\"{want}\"")));
            if !output.status.success() || !body_ok {
                bail!(
                    "{target} at {url} did not answer 200 {want:?}:\n{text}\n{}",
                    String::from_utf8_lossy(&output.stderr)
                );
            }
        }
        Ok(())
    }

    /// CPU time of every process under test, in ticks.
    fn all_cpu_ticks(&self) -> anyhow::Result<u64> {
        self.groups.values().map(Group::cpu_ticks).sum()
    }

    fn group(&self, name: &str) -> anyhow::Result<&Group> {
        self.groups
            .get(name)
            .with_context(|| format!("no process group {name}"))
    }

    /// Resident memory of each of our services now, in MiB.
    fn idle_rss(&self) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        self.rss_of("VmRSS")
    }

    /// The peak resident memory of each service over its life (`VmHWM`), in MiB.
    fn peak_rss(&self) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        self.rss_of("VmHWM")
    }

    fn rss_of(&self, key: &str) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        let mut rss = BTreeMap::new();
        for (&name, group) in &self.groups {
            rss.insert(name, group.rss_kib(key) as f64 / 1024.0);
        }
        Ok(rss)
    }
}

/// How a case's client connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// HTTP/1.1, keep-alive.
    KeepAlive,
    /// A new connection (and TLS handshake) for every request.
    Churn,
    /// HTTP/2, one stream per connection at a time.
    Http2,
}

/// A URL under load and the processes that serve it.
#[derive(Debug, Clone, Copy)]
struct Target {
    /// The URL's key in [`Stack::urls`].
    key: &'static str,
    /// The service measured, for `--only`.
    service: &'static str,
    /// Our code (its errors count against the budget) or the nginx reference.
    ours: bool,
    /// The process groups whose CPU time a request costs.
    cpu: &'static [&'static str],
}

const fn target(
    key: &'static str,
    service: &'static str,
    ours: bool,
    cpu: &'static [&'static str],
) -> Target {
    Target {
        key,
        service,
        ours,
        cpu,
    }
}

/// The main targets, ours and the reference's alternating.
const TARGETS: [Target; 6] = [
    target(PETRA, "petra", true, &[PETRA]),
    target(NGINX_PETRA, "petra", false, &[NGINX_PETRA]),
    target(KLAUS_HTTPS, "klaus", true, &[KLAUS_HTTPS, PETRA]),
    target(
        NGINX_KLAUS_HTTPS,
        "klaus",
        false,
        &[NGINX_KLAUS, NGINX_PETRA],
    ),
    target(KLAUS_HTTP, "klaus", true, &[KLAUS_HTTP, PETRA]),
    target(
        NGINX_KLAUS_HTTP,
        "klaus",
        false,
        &[NGINX_KLAUS, NGINX_PETRA],
    ),
];

/// One measured load.
#[derive(Debug, Clone)]
struct Case {
    id: String,
    target: Target,
    conns: usize,
    mode: Mode,
}

/// Every case. Ours and the reference's run next to each other at each step, so that a change
/// in the machine's load hits both.
fn cases(options: &Options) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut push = |target: Target, conns: usize, mode: Mode| {
        if options.measures(target.service) {
            let kind = match mode {
                Mode::KeepAlive => "c",
                Mode::Churn => "churn-c",
                Mode::Http2 => "h2-c",
            };
            cases.push(Case {
                id: format!("{}/{kind}{conns}", target.key),
                target,
                conns,
                mode,
            });
        }
    };
    // The budget's cases first, while the machine is most likely as quiet as it was when the
    // run started; logging's cost (RUST_LOG=warn) and Petra's HTTP/2 path right beside them.
    for t in TARGETS {
        push(t, BUDGET_CONNECTIONS, Mode::KeepAlive);
    }
    let petra_warn = target(PETRA_WARN, "petra", true, &[PETRA_WARN]);
    let klaus_warn = target(KLAUS_WARN, "klaus", true, &[KLAUS_WARN, PETRA_WARN]);
    push(petra_warn, BUDGET_CONNECTIONS, Mode::KeepAlive);
    push(klaus_warn, BUDGET_CONNECTIONS, Mode::KeepAlive);
    push(TARGETS[0], BUDGET_CONNECTIONS, Mode::Http2);
    for conns in CONNECTIONS.into_iter().filter(|&c| c != BUDGET_CONNECTIONS) {
        for t in TARGETS {
            push(t, conns, Mode::KeepAlive);
        }
    }
    for t in TARGETS {
        push(t, BUDGET_CONNECTIONS, Mode::Churn);
    }
    cases
}

/// What one case measured.
#[derive(Debug, Clone)]
struct Measured {
    case: Case,
    responses: u64,
    seconds: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    errors: u64,
    non_2xx: u64,
    error_kinds: BTreeMap<String, u64>,
    cpu_us_per_request: f64,
    cpu_seconds: BTreeMap<&'static str, f64>,
    peak_rss_mb: BTreeMap<&'static str, f64>,
    /// CPU used by other processes during the window, in % of all cores.
    background_pct: f64,
}

impl Measured {
    fn one_line(&self) -> String {
        format!(
            "{:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, {} errors, {} non-2xx, \
             {:.1} µs CPU/req, other load {:.0} %",
            self.rps,
            self.p50_ms,
            self.p99_ms,
            self.p999_ms,
            self.errors,
            self.non_2xx,
            self.cpu_us_per_request,
            self.background_pct
        )
    }
}

/// Samples the resident memory of some groups until stopped; returns each one's peak in MiB.
struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<BTreeMap<&'static str, f64>>,
}

impl RssSampler {
    fn start(groups: Vec<(&'static str, Group)>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let handle = thread::spawn(move || {
            let mut peak: BTreeMap<&'static str, f64> = BTreeMap::new();
            loop {
                for (name, group) in &groups {
                    let mb = group.rss_kib("VmRSS") as f64 / 1024.0;
                    let entry = peak.entry(name).or_insert(0.0);
                    *entry = entry.max(mb);
                }
                if flag.load(Ordering::Relaxed) {
                    return peak;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Self { stop, handle }
    }

    fn finish(self) -> BTreeMap<&'static str, f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Warms up, then runs oha for the measured window while reading the servers' CPU time and
/// memory.
fn measure(
    stack: &Stack,
    tools: &Tools,
    certs: &Path,
    out: &Path,
    case: &Case,
    options: &Options,
    machine: &Machine,
) -> anyhow::Result<Measured> {
    let (clk_tck, cores) = (machine.clk_tck, machine.cores);
    let url = stack
        .urls
        .get(case.target.key)
        .with_context(|| format!("no URL for {}", case.target.key))?;
    for proc in &stack.procs {
        // A service that died would show as errors; say which one.
        if stat_fields(proc.pid()).is_none_or(|f| f.first().map(String::as_str) == Some("Z")) {
            bail!("{} is no longer running", proc.name);
        }
    }
    run_oha(tools, certs, case, url, options.warmup).context("warm-up")?;

    let groups: Vec<(&'static str, Group)> = case
        .target
        .cpu
        .iter()
        .map(|&name| Ok((name, stack.group(name)?.clone())))
        .collect::<anyhow::Result<_>>()?;
    let before: Vec<u64> = groups
        .iter()
        .map(|(_, g)| g.cpu_ticks())
        .collect::<anyhow::Result<_>>()?;
    let ours_before = stack.all_cpu_ticks()? + own_ticks()?;
    let busy_before = machine_busy_ticks()?;
    let window = Instant::now();
    let sampler = RssSampler::start(groups.clone());
    let raw = run_oha(tools, certs, case, url, options.duration);
    let peak_rss_mb = sampler.finish();
    let raw = raw?;
    let after: Vec<u64> = groups
        .iter()
        .map(|(_, g)| g.cpu_ticks())
        .collect::<anyhow::Result<_>>()?;
    // Whatever else kept the cores busy in the window: the machine's busy time minus the
    // servers', oha's and this task's own. Anything well above zero skews the figures.
    let busy = machine_busy_ticks()?.saturating_sub(busy_before);
    let ours = (stack.all_cpu_ticks()? + own_ticks()?).saturating_sub(ours_before);
    let capacity = window.elapsed().as_secs_f64() * clk_tck as f64 * cores as f64;
    let background_pct = busy.saturating_sub(ours) as f64 / capacity * 100.0;
    let file = raw_path(out, case);
    fs::write(&file, &raw).with_context(|| format!("writing {}", file.display()))?;

    let oha: Value = serde_json::from_str(&raw).context("parsing oha's JSON output")?;
    let seconds = oha["summary"]["total"]
        .as_f64()
        .context("oha: no summary.total")?;
    let mut responses = 0;
    let mut non_2xx = 0;
    if let Some(codes) = oha["statusCodeDistribution"].as_object() {
        for (code, count) in codes {
            let count = count.as_u64().unwrap_or(0);
            responses += count;
            if !code.starts_with('2') {
                non_2xx += count;
            }
        }
    }
    let mut error_kinds = BTreeMap::new();
    if let Some(errors) = oha["errorDistribution"].as_object() {
        for (kind, count) in errors {
            error_kinds.insert(kind.clone(), count.as_u64().unwrap_or(0));
        }
    }
    let errors = error_kinds.values().sum();
    let percentile = |key: &str| oha["latencyPercentiles"][key].as_f64().unwrap_or(f64::NAN) * 1e3;
    let clk_tck = clk_tck as f64;
    let mut cpu_seconds = BTreeMap::new();
    let mut total_ticks = 0;
    for (((name, _), b), a) in groups.iter().zip(&before).zip(&after) {
        let ticks = a.saturating_sub(*b);
        total_ticks += ticks;
        cpu_seconds.insert(*name, ticks as f64 / clk_tck);
    }
    let cpu_us_per_request = if responses > 0 {
        total_ticks as f64 / clk_tck * 1e6 / responses as f64
    } else {
        f64::NAN
    };
    Ok(Measured {
        case: case.clone(),
        responses,
        seconds,
        rps: responses as f64 / seconds,
        p50_ms: percentile("p50"),
        p99_ms: percentile("p99"),
        p999_ms: percentile("p99.9"),
        errors,
        non_2xx,
        error_kinds,
        cpu_us_per_request,
        cpu_seconds,
        peak_rss_mb,
        background_pct,
    })
}

/// Where oha's own report of a case is kept.
fn raw_path(out: &Path, case: &Case) -> PathBuf {
    out.join(format!("raw/{}.json", case.id.replace('/', "-")))
}

/// Waits up to `max` for other processes to leave the cores alone (under 10 % of them, over
/// one second), so that a burst of someone else's work does not land in a measured window.
/// Appends the budget lines `checks` to `md` as a markdown table.
fn budget_table(md: &mut String, checks: &[Check]) {
    md.push_str("\n| budget | figure | limit | result |\n|---|---|---|---|\n");
    for c in checks {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            c.line,
            c.figure,
            c.limit,
            c.result()
        );
    }
}

fn wait_for_quiet(stack: &Stack, machine: &Machine, max: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut said = false;
    loop {
        let (busy, ours) = (machine_busy_ticks()?, stack.all_cpu_ticks()? + own_ticks()?);
        let window = Instant::now();
        thread::sleep(Duration::from_secs(1));
        let busy = machine_busy_ticks()?.saturating_sub(busy);
        let ours = (stack.all_cpu_ticks()? + own_ticks()?).saturating_sub(ours);
        let capacity = window.elapsed().as_secs_f64() * (machine.clk_tck * machine.cores) as f64;
        let other = busy.saturating_sub(ours) as f64 / capacity * 100.0;
        if other < 10.0 {
            return Ok(());
        }
        if started.elapsed() >= max {
            println!("    the machine is still busy (other load {other:.0} %); measuring anyway");
            return Ok(());
        }
        if !said {
            println!("    waiting up to {max:?} for other load ({other:.0} %) to pass");
            said = true;
        }
    }
}

/// Busy time of the whole machine, all cores, in clock ticks (`/proc/stat` minus idle and
/// iowait).
fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("cpu "))
        .context("/proc/stat has no cpu line")?
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    Ok(fields
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum())
}

/// CPU time of this task and of the children it has waited for (the oha runs), in ticks.
fn own_ticks() -> anyhow::Result<u64> {
    let fields = stat_fields(std::process::id()).context("reading /proc/self/stat")?;
    // utime, stime, cutime, cstime.
    Ok((11..=14)
        .filter_map(|i| fields.get(i)?.parse::<u64>().ok())
        .sum())
}

/// Runs oha for `duration` and returns its JSON report. Requests still running at the end
/// are waited for (`-w`), so that none is counted as an error.
fn run_oha(
    tools: &Tools,
    certs: &Path,
    case: &Case,
    url: &str,
    duration: Duration,
) -> anyhow::Result<String> {
    let mut command = tools.command(&tools.oha);
    command
        // The breakdown adds the latency of the 2xx answers alone, which the overload case reads.
        .args([
            "--no-tui",
            "--output-format",
            "json",
            "-w",
            "--stats-success-breakdown",
        ])
        .arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .arg("-c")
        .arg(case.conns.to_string())
        .arg("--cacert")
        .arg(certs.join("ca.crt"));
    match case.mode {
        Mode::KeepAlive => {}
        Mode::Churn => {
            command.arg("--disable-keepalive");
        }
        Mode::Http2 => {
            command.arg("--http2");
        }
    }
    if case.target.key.contains("petra") {
        command
            .arg("--cert")
            .arg(certs.join("klaus/tls.crt"))
            .arg("--key")
            .arg(certs.join("klaus/tls.key"));
    }
    let output = command
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .context("running oha")?;
    if !output.status.success() {
        bail!(
            "oha failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).context("oha's output is not UTF-8")
}

/// One line of the budget and how the run did against it.
#[derive(Debug)]
struct Check {
    line: String,
    figure: String,
    limit: String,
    /// `None` when the run did not measure it (`--only`).
    pass: Option<bool>,
}

impl Check {
    fn result(&self) -> &'static str {
        match self.pass {
            Some(true) => "pass",
            Some(false) => "**MISS**",
            None => "not measured",
        }
    }

    fn json(&self) -> Value {
        json!({ "line": self.line, "figure": self.figure, "limit": self.limit, "pass": self.pass })
    }
}

/// Everything a run found.
#[derive(Debug)]
struct Report {
    machine: Machine,
    options: Options,
    startup: Startup,
    idle: BTreeMap<&'static str, f64>,
    peak: BTreeMap<&'static str, f64>,
    results: Vec<Measured>,
    /// The A/B comparison with `--baseline`.
    ab: Option<ab::Ab>,
    /// The distance and overload cases.
    placement: Option<placement::Placement>,
    wall: Duration,
}

impl Report {
    fn find(&self, target: &str, conns: usize, mode: Mode) -> Option<&Measured> {
        self.results
            .iter()
            .find(|m| m.case.target.key == target && m.case.conns == conns && m.case.mode == mode)
    }

    /// The peak RSS of a group over the 512-connection cases.
    fn rss_at_512(&self, group: &str) -> Option<f64> {
        self.results
            .iter()
            .filter(|m| m.case.conns == 512)
            .filter_map(|m| m.peak_rss_mb.get(group).copied())
            .reduce(f64::max)
    }

    fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        let klaus = self.find(KLAUS_HTTPS, BUDGET_CONNECTIONS, Mode::KeepAlive);
        let nginx = self.find(NGINX_KLAUS_HTTPS, BUDGET_CONNECTIONS, Mode::KeepAlive);
        let petra = self.find(PETRA, BUDGET_CONNECTIONS, Mode::KeepAlive);

        // 45 µs where the nginx pair needed 53 µs: scaled by this machine's nginx figure.
        let cpu_limit = nginx.map(|n| {
            budget::CPU_US_PER_KLAUS_REQUEST * n.cpu_us_per_request / budget::NGINX_CPU_US_AT_BUDGET
        });
        checks.push(Check {
            line: "CPU per Klaus request (Klaus + Petra), 64 conns".into(),
            figure: klaus.map_or("not measured".into(), |k| {
                format!(
                    "{:.1} µs (nginx pair {})",
                    k.cpu_us_per_request,
                    nginx.map_or("–".into(), |n| format!("{:.1} µs", n.cpu_us_per_request))
                )
            }),
            limit: cpu_limit.map_or_else(
                || format!("≤ {:.0} µs", budget::CPU_US_PER_KLAUS_REQUEST),
                |limit| {
                    format!(
                        "≤ {limit:.1} µs (45 µs × nginx pair / 53 µs; absolute 45 µs: {})",
                        if klaus.is_some_and(
                            |k| k.cpu_us_per_request <= budget::CPU_US_PER_KLAUS_REQUEST
                        ) {
                            "met"
                        } else {
                            "missed"
                        }
                    )
                },
            ),
            pass: klaus
                .zip(cpu_limit)
                .map(|(k, limit)| k.cpu_us_per_request <= limit),
        });
        // Ahead of the nginx pair when requests are batched, and at one request at a time too.
        for conns in [BUDGET_CONNECTIONS, 1] {
            let klaus = self.find(KLAUS_HTTPS, conns, Mode::KeepAlive);
            let nginx = self.find(NGINX_KLAUS_HTTPS, conns, Mode::KeepAlive);
            checks.push(Check {
                line: format!(
                    "Klaus throughput vs nginx pair, {conns} conn{}",
                    if conns == 1 { "" } else { "s" }
                ),
                figure: match (klaus, nginx) {
                    (Some(k), Some(n)) => format!(
                        "{:.0} vs {:.0} req/s ({:+.0} %)",
                        k.rps,
                        n.rps,
                        (k.rps / n.rps - 1.0) * 100.0
                    ),
                    _ => "not measured".into(),
                },
                limit: "≥ nginx pair".into(),
                pass: klaus.zip(nginx).map(|(k, n)| k.rps >= n.rps),
            });
        }
        checks.push(Check {
            line: "Klaus p99 vs Petra-direct p99, 64 conns".into(),
            figure: match (klaus, petra) {
                (Some(k), Some(p)) => format!(
                    "{:.3} vs {:.3} ms ({:.2}×)",
                    k.p99_ms,
                    p.p99_ms,
                    k.p99_ms / p.p99_ms
                ),
                _ => "not measured".into(),
            },
            limit: format!("≤ {:.0}×", budget::P99_RATIO),
            pass: klaus
                .zip(petra)
                .map(|(k, p)| k.p99_ms <= budget::P99_RATIO * p.p99_ms),
        });
        for (service, group) in [("Petra", PETRA), ("Klaus", KLAUS_HTTPS)] {
            let idle = self.idle.get(group).copied();
            checks.push(Check {
                line: format!("{service} idle RSS"),
                figure: idle.map_or("–".into(), |mb| format!("{mb:.1} MB")),
                limit: format!("≤ {:.0} MB", budget::IDLE_RSS_MB),
                pass: idle.map(|mb| mb <= budget::IDLE_RSS_MB),
            });
        }
        for (service, groups) in [
            ("Petra", &[PETRA][..]),
            ("Klaus", &[KLAUS_HTTPS, KLAUS_HTTP]),
        ] {
            let rss = groups
                .iter()
                .filter_map(|g| self.rss_at_512(g))
                .reduce(f64::max);
            checks.push(Check {
                line: format!("{service} RSS at 512 conns"),
                figure: rss.map_or("not measured".into(), |mb| format!("{mb:.1} MB")),
                limit: format!("≤ {:.0} MB", budget::LOADED_RSS_MB),
                pass: rss.map(|mb| mb <= budget::LOADED_RSS_MB),
            });
        }
        for (service, key) in [("Petra", "petra"), ("Klaus", "klaus")] {
            let ms = self.startup.get(key).map(|runs| median(runs));
            checks.push(Check {
                line: format!("{service} startup to ready (median)"),
                figure: ms.map_or("–".into(), |ms| format!("{ms:.1} ms")),
                limit: format!("≤ {:.0} ms", budget::STARTUP_MS),
                pass: ms.map(|ms| ms <= budget::STARTUP_MS),
            });
        }
        if let Some(ab) = &self.ab {
            checks.push(ab.check());
        }
        if let Some(placement) = &self.placement {
            checks.extend(placement.checks());
        }
        let ours: Vec<&Measured> = self
            .results
            .iter()
            .filter(|m| m.case.target.ours)
            .chain(self.ab.iter().flat_map(|ab| ab.current()))
            .collect();
        let failed: u64 = ours.iter().map(|m| m.errors + m.non_2xx).sum();
        let total: u64 = ours.iter().map(|m| m.responses + m.errors).sum();
        checks.push(Check {
            line: "Errors and non-2xx, Petra and Klaus, every case".into(),
            figure: format!("{failed} of {total}"),
            limit: "0".into(),
            pass: (!ours.is_empty()).then_some(failed == 0),
        });
        checks
    }

    fn markdown(&self, checks: &[Check]) -> String {
        let m = &self.machine;
        let mut md = String::new();
        let _ = writeln!(
            md,
            "Run {} on {} cores ({}), {}; load average {} before, {} after; \
             {} s per case after a {} s warm-up; {}, nginx {}. Wall time {:.0} s.\n",
            m.date,
            m.cores,
            m.cpu,
            m.kernel,
            m.load_before,
            m.load_after,
            self.options.duration.as_secs_f64(),
            self.options.warmup.as_secs_f64(),
            m.oha,
            m.nginx,
            self.wall.as_secs_f64()
        );
        md.push_str(
            "| case | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | non-2xx | server CPU µs/req | other load |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n",
        );
        for r in &self.results {
            let _ = writeln!(
                md,
                "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} % |",
                describe(&r.case),
                r.case.conns,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.errors,
                r.non_2xx,
                r.cpu_us_per_request,
                r.background_pct
            );
        }
        md.push_str(
            "\n| process | startup to ready, median (min–max) | idle RSS MB | RSS at 512 conns MB | peak RSS MB |\n\
             |---|--:|--:|--:|--:|\n",
        );
        for (name, startup) in [
            (PETRA, Some("petra")),
            (KLAUS_HTTPS, Some("klaus")),
            (KLAUS_HTTP, None),
            (PETRA_WARN, None),
            (KLAUS_WARN, None),
            (NGINX_PETRA, None),
            (NGINX_KLAUS, None),
        ] {
            let startup = startup
                .and_then(|s| self.startup.get(s))
                .map_or("–".into(), |runs| {
                    format!(
                        "{:.1} ms ({:.1}–{:.1})",
                        median(runs),
                        runs.first().copied().unwrap_or(f64::NAN),
                        runs.last().copied().unwrap_or(f64::NAN)
                    )
                });
            let mb = |v: Option<f64>| v.map_or("–".into(), |v| format!("{v:.1}"));
            let _ = writeln!(
                md,
                "| {name} | {startup} | {} | {} | {} |",
                mb(self.idle.get(name).copied()),
                mb(self.rss_at_512(name)),
                mb(self.peak.get(name).copied()),
            );
        }
        if let Some(ab) = &self.ab {
            ab.markdown(&mut md);
        }
        if let Some(placement) = &self.placement {
            placement.markdown(&mut md);
        }
        budget_table(&mut md, checks);
        md
    }

    fn json(&self, checks: &[Check]) -> Value {
        let m = &self.machine;
        json!({
            "machine": {
                "cores": m.cores, "cpu": m.cpu, "kernel": m.kernel, "date": m.date,
                "load_before": m.load_before, "load_after": m.load_after,
                "oha": m.oha, "nginx": m.nginx, "clk_tck": m.clk_tck,
            },
            "duration_s": self.options.duration.as_secs_f64(),
            "warmup_s": self.options.warmup.as_secs_f64(),
            "wall_s": self.wall.as_secs_f64(),
            "startup_ms": self.startup,
            "idle_rss_mb": self.idle,
            "peak_rss_mb": self.peak,
            "cases": self.results.iter().map(case_json).collect::<Vec<_>>(),
            "baseline": self.ab.as_ref().map(ab::Ab::json),
            "placement": self.placement.as_ref().map(placement::Placement::json),
            "budget": checks.iter().map(Check::json).collect::<Vec<_>>(),
        })
    }
}

/// One measured case in `summary.json`.
fn case_json(r: &Measured) -> Value {
    json!({
        "id": r.case.id,
        "what": describe(&r.case),
        "target": r.case.target.key,
        "ours": r.case.target.ours,
        "connections": r.case.conns,
        "mode": format!("{:?}", r.case.mode),
        "responses": r.responses,
        "seconds": r.seconds,
        "requests_per_second": r.rps,
        "p50_ms": r.p50_ms,
        "p99_ms": r.p99_ms,
        "p99_9_ms": r.p999_ms,
        "errors": r.errors,
        "error_kinds": r.error_kinds,
        "non_2xx": r.non_2xx,
        "cpu_us_per_request": r.cpu_us_per_request,
        "cpu_seconds": r.cpu_seconds,
        "peak_rss_mb": r.peak_rss_mb,
        "other_load_percent": r.background_pct,
    })
}

/// A case in words, for the table.
fn describe(case: &Case) -> String {
    let what = match case.target.key {
        PETRA => "Petra direct (mTLS)",
        PETRA_WARN => "Petra direct (mTLS), RUST_LOG=warn",
        KLAUS_HTTPS => "Klaus e2e, HTTPS front",
        KLAUS_HTTP => "Klaus e2e, HTTP front",
        KLAUS_WARN => "Klaus e2e, HTTPS front, RUST_LOG=warn",
        NGINX_PETRA => "nginx as Petra (mTLS)",
        NGINX_KLAUS_HTTPS => "nginx pair e2e, HTTPS front",
        NGINX_KLAUS_HTTP => "nginx pair e2e, HTTP front",
        other => other,
    };
    match case.mode {
        Mode::KeepAlive => what.to_owned(),
        Mode::Churn => format!("{what}, new connection per request"),
        Mode::Http2 => format!("{what}, HTTP/2"),
    }
}
