//! `cargo xtask e2e`: builds the images, brings up each compose topology and checks it end to end, then
//! runs the fault scenarios ([`faults`]: rolling restart, partition, overload) on the single-network one
//! and the failover between two clouds ([`failover`]) on the two-cloud one.
//!
//! The split topology has a link between Klaus and Petra, and runs its checks at three distances
//! ([`distance`]). [`monitoring`] runs a host Prometheus against docker-compose.yml, and
//! [`observability`] the override that adds Prometheus and tracesink in compose.
//!
//! Each topology runs under a project name of its own and is always torn down (`down -v --remove-orphans`),
//! also when a check fails. Every wait polls a condition under a deadline; none is a fixed sleep.

mod certs;
mod containers;
mod cut;
mod distance;
mod failover;
mod faults;
mod monitoring;
mod observability;
mod picture;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use xshell::{Shell, cmd};

use crate::http::get;
use crate::oha::Oha;
use crate::util::{root, shell, step};

/// Where Klaus is published on the host in every topology.
const KLAUS_PORT: u16 = 8080;

/// How long the services may take to come up and answer after `up -d`.
const STARTUP_DEADLINE: Duration = Duration::from_secs(60);

/// How soon Klaus must answer 502 once Petra is stopped.
const OUTAGE_DEADLINE: Duration = Duration::from_secs(1);

/// The problem code of Klaus's 502 while no Petra runs, in every topology and at every distance.
const OUTAGE_CODE: &str = "petra_unreachable";

/// How soon Klaus must answer `hello world` again once Petra is started.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(5);

/// The pause between two polls of a condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One way of running Petra and Klaus with compose.
#[derive(Debug)]
struct Topology {
    /// A short name, part of the compose project name.
    name: &'static str,
    /// The compose file, relative to the workspace root.
    file: &'static str,
    /// The network Klaus is on, without the project prefix.
    klaus_network: &'static str,
    /// The URL Klaus calls Petra at.
    petra_url: &'static str,
    /// The host port Petra is published on, if it is.
    petra_port: Option<u16>,
    /// Every Petra service: all are stopped for the outage check.
    petra_services: &'static [&'static str],
    /// The link service (slowlink) every call from Klaus to Petra crosses, if there is one: the
    /// checks then run at each of [`distance::DISTANCES`].
    link: Option<&'static str>,
}

const TOPOLOGIES: [Topology; 3] = [
    Topology {
        name: "one",
        file: "docker-compose.yml",
        klaus_network: "default",
        petra_url: "https://petra:8443",
        petra_port: None,
        petra_services: &["petra"],
        link: None,
    },
    Topology {
        name: "split",
        file: "docker-compose.split.yml",
        klaus_network: "klaus-side",
        petra_url: "https://link:8443",
        petra_port: Some(8443),
        petra_services: &["petra"],
        link: Some("link"),
    },
    Topology {
        name: "clouds",
        file: "docker-compose.clouds.yml",
        klaus_network: "cloud-a",
        petra_url: "https://petra-a:8443,https://host.docker.internal:8444",
        // Cloud B's Petra; cloud A's is not published.
        petra_port: Some(8444),
        petra_services: &["petra-a", "petra-b"],
        link: None,
    },
];

/// The parts of `cargo xtask e2e` that can be run alone: each topology's name, then the scenarios.
const PARTS: [&str; 7] = [
    "one",
    "split",
    "clouds",
    "faults",
    "failover",
    "monitoring",
    "observability",
];

/// The flags of `cargo xtask e2e`.
#[derive(Debug, clap::Args)]
pub(crate) struct E2eArgs {
    /// Run only these parts: a topology (one, split, clouds) or a scenario (faults, failover,
    /// monitoring, observability). The images are built in any case. Default: every part.
    #[arg(value_name = "PART", value_parser = clap::builder::PossibleValuesParser::new(PARTS))]
    pub(crate) parts: Vec<String>,
}

/// Builds both images, runs every check against each topology in turn, then the fault scenarios
/// and the failover.
pub(crate) fn e2e() -> anyhow::Result<()> {
    e2e_parts(&[])
}

/// `cargo xtask e2e [PART...]`: as [`e2e`], but only the named parts (of [`PARTS`], which
/// [`E2eArgs`] checks) when some are named; the images are built in any case.
pub(crate) fn e2e_parts(only: &[String]) -> anyhow::Result<()> {
    let wanted = |part: &str| only.is_empty() || only.iter().any(|p| p == part);
    crate::images::images()?;
    let sh = shell()?;
    let compose = step("compose is installed", || compose_command(&sh))?;
    step("curl is installed", || ensure_curl(&sh))?;
    let oha = step("oha is installed", || Oha::find(&sh))?;
    if wanted("one") {
        step(
            "the Petra image's certs subcommand writes an overlay's certificates (docker run)",
            || certs::run(&sh),
        )?;
    }
    for topology in TOPOLOGIES.iter().filter(|t| wanted(t.name)) {
        step(&format!("e2e {}", topology.file), || {
            run_topology(&sh, &compose, &oha, topology)
        })?;
    }
    if wanted("faults") {
        step(
            "e2e docker-compose.yml faults: rolling restart, partition, overload",
            || faults::run(&sh, &compose, &oha),
        )?;
    }
    if wanted("monitoring") {
        step(
            "e2e docker-compose.yml monitoring: Prometheus with the shipped rules and the dashboard's queries",
            || monitoring::run(&sh, &compose, &oha),
        )?;
    }
    if wanted("observability") {
        step(
            "e2e docker-compose.yml with docker-compose.observability.yml: traces in tracesink, Prometheus with the rules",
            || observability::run(&sh, &compose),
        )?;
    }
    if wanted("failover") {
        step(
            "e2e docker-compose.clouds.yml failover: cloud A stopped and started under load",
            || failover::run(&sh, &compose, &oha),
        )?;
    }
    Ok(())
}

/// The compose command: `docker-compose` (1.29 here) or the `docker compose` plugin; installs
/// `docker-compose` from Debian's packages when neither is there.
pub(crate) fn compose_command(sh: &Shell) -> anyhow::Result<Vec<String>> {
    let works = |program: &str, args: &[&str]| {
        sh.cmd(program)
            .args(args)
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .is_ok()
    };
    if !works("docker-compose", &["version"]) && !works("docker", &["compose", "version"]) {
        cmd!(sh, "apt-get update").run()?;
        cmd!(sh, "apt-get install -y docker-compose")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get install docker-compose failed")?;
    }
    if works("docker-compose", &["version"]) {
        Ok(vec!["docker-compose".to_owned()])
    } else if works("docker", &["compose", "version"]) {
        Ok(vec!["docker".to_owned(), "compose".to_owned()])
    } else {
        bail!("neither `docker-compose` nor `docker compose` works")
    }
}

/// Installs curl from Debian's packages when it is missing; the mTLS check calls Petra with it.
fn ensure_curl(sh: &Shell) -> anyhow::Result<()> {
    if cmd!(sh, "curl --version")
        .quiet()
        .ignore_stdout()
        .run()
        .is_ok()
    {
        return Ok(());
    }
    cmd!(sh, "apt-get update").run()?;
    cmd!(sh, "apt-get install -y curl")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
        .context("apt-get install curl failed")?;
    Ok(())
}

/// A compose project that is torn down, volumes and all, when it goes out of scope.
struct Project<'a> {
    sh: &'a Shell,
    compose: &'a [String],
    name: String,
    file: &'static str,
}

impl Project<'_> {
    /// `compose -p NAME -f FILE [-f EXTRA]... <args>`.
    fn command(&self, extra: &[&Path], args: &[&str]) -> xshell::Cmd<'_> {
        let mut command = self
            .sh
            .cmd(&self.compose[0])
            .args(&self.compose[1..])
            .args(["-p", &self.name, "-f", self.file]);
        for file in extra {
            command = command.arg("-f").arg(file);
        }
        command.args(args)
    }

    /// Runs `compose -p NAME -f FILE <args>`.
    fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        self.run_with(&[], args)
    }

    /// Runs `compose -p NAME -f FILE -f EXTRA... <args>`: the compose file with overrides.
    fn run_with(&self, extra: &[&Path], args: &[&str]) -> anyhow::Result<()> {
        self.command(extra, args)
            .run()
            .with_context(|| format!("compose {} failed", args.join(" ")))?;
        Ok(())
    }

    /// The IDs of the containers of `service`. Call it while they run: the compose v2 plugin lists only
    /// running containers.
    fn containers(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let ids = self
            .command(&[], &["ps", "-q", service])
            .quiet()
            .read()
            .with_context(|| format!("compose ps -q {service} failed"))?;
        Ok(ids.split_whitespace().map(str::to_owned).collect())
    }
}

impl Drop for Project<'_> {
    fn drop(&mut self) {
        println!("tearing down {}", self.name);
        if let Err(err) = self.run(&["down", "-v", "--remove-orphans", "--timeout", "10"]) {
            eprintln!("warning: tearing down {} failed: {err:#}", self.name);
        }
    }
}

/// A container removed (with `docker rm -f`) when it goes out of scope.
struct Container<'a> {
    sh: &'a Shell,
    name: String,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let name = &self.name;
        let _ = cmd!(self.sh, "docker rm -f {name}")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run();
    }
}

/// Brings one topology up, runs every check, prints the logs if one fails, and tears it down.
fn run_topology(
    sh: &Shell,
    compose: &[String],
    oha: &Oha,
    topology: &Topology,
) -> anyhow::Result<()> {
    let mut ports = vec![KLAUS_PORT];
    ports.extend(topology.petra_port);
    for port in ports {
        ensure_port_free(port)?;
    }
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-{}", std::process::id(), topology.name),
        file: topology.file,
    };
    project.run(&["up", "-d"])?;
    let result = checks(sh, &project, oha, topology);
    if result.is_err() {
        let _ = project.run(&["logs", "--no-color", "--tail", "40"]);
    }
    result
}

/// Fails with a clear message when a host port the topology publishes is taken.
fn ensure_port_free(port: u16) -> anyhow::Result<()> {
    TcpListener::bind(("0.0.0.0", port)).map(drop).with_context(|| {
        format!("host port {port} is in use; the compose files publish it, so free it first (see `ss -ltnp`)")
    })
}

/// The checks, in order; each prints a line when it passes.
fn checks(sh: &Shell, project: &Project<'_>, oha: &Oha, topology: &Topology) -> anyhow::Result<()> {
    let klaus: SocketAddr = ([127, 0, 0, 1], KLAUS_PORT).into();

    let started = Instant::now();
    let reply = wait_for(STARTUP_DEADLINE, || {
        get(klaus, "/").ok().filter(|r| r.status == 200)
    })
    .context("Klaus did not answer 200 after `up -d`")?;
    pass(&format!(
        "Klaus answers 200 ({:.1}s after up)",
        started.elapsed().as_secs_f64()
    ));
    ensure!(
        reply.body == "hello world",
        "GET / gave {:?}, not \"hello world\"",
        reply.body
    );
    pass("GET http://localhost:8080/ is exactly `hello world`");

    if let Some(port) = topology.petra_port {
        curl_petra_directly(sh, project, port)?;
    }
    match topology.link {
        Some(link) => distance::run(sh, project, oha, topology, link, klaus),
        None => placement(sh, project, topology, klaus).map(drop),
    }
}

/// What the placement checks saw.
#[derive(Debug)]
struct Placement {
    /// The problem code of Klaus's 502 while Petra was stopped.
    outage_code: String,
    /// How soon after Petra stopped Klaus answered that 502.
    outage_after: Duration,
    /// How soon after Petra started Klaus answered `hello world` again.
    recovered_after: Duration,
}

/// The checks that must give the same answers wherever Petra runs: a client without a
/// certificate is refused, Klaus answers 502 `petra_unreachable` while every Petra is stopped,
/// and `hello world` again once they are started.
fn placement(
    sh: &Shell,
    project: &Project<'_>,
    topology: &Topology,
    klaus: SocketAddr,
) -> anyhow::Result<Placement> {
    refused_without_client_cert(sh, project, topology)?;

    let mut stop = vec!["stop"];
    stop.extend(topology.petra_services);
    project.run(&stop)?;
    let stopped = Instant::now();
    let reply = wait_for(OUTAGE_DEADLINE, || {
        get(klaus, "/").ok().filter(|r| r.status == 502)
    })
    .with_context(|| {
        format!("Klaus did not answer 502 within {OUTAGE_DEADLINE:?} of Petra stopping")
    })?;
    let outage_after = stopped.elapsed();
    ensure!(
        reply.content_type == "application/problem+json",
        "Klaus's 502 has content-type {:?}, not application/problem+json",
        reply.content_type
    );
    let outage_code = problem_code(&reply.body)?;
    ensure!(
        outage_code == OUTAGE_CODE,
        "Klaus's 502 while Petra is stopped has the code {outage_code:?}, not {OUTAGE_CODE:?}"
    );
    pass(&format!(
        "{} stopped: Klaus answers 502 application/problem+json `{outage_code}` after {:.2}s",
        topology.petra_services.join(", "),
        outage_after.as_secs_f64()
    ));

    let mut start = vec!["start"];
    start.extend(topology.petra_services);
    project.run(&start)?;
    let restarted = Instant::now();
    wait_for(RECOVERY_DEADLINE, || {
        get(klaus, "/")
            .ok()
            .filter(|r| r.status == 200 && r.body == "hello world")
    })
    .with_context(|| {
        format!("Klaus did not answer `hello world` within {RECOVERY_DEADLINE:?} of Petra starting")
    })?;
    let recovered_after = restarted.elapsed();
    pass(&format!(
        "{} started: Klaus answers `hello world` again after {:.2}s",
        topology.petra_services.join(", "),
        recovered_after.as_secs_f64()
    ));
    Ok(Placement {
        outage_code,
        outage_after,
        recovered_after,
    })
}

/// The `code` of an RFC 9457 problem body.
fn problem_code(body: &str) -> anyhow::Result<String> {
    let problem: serde_json::Value =
        serde_json::from_str(body).with_context(|| format!("the problem {body:?} is not JSON"))?;
    problem["code"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("the problem {body:?} has no code"))
}

/// Runs a second Klaus, on Klaus's network with Petra's CA but no client certificate, and checks that
/// Petra refuses it: the answer must be Klaus's problem for a missing client certificate.
fn refused_without_client_cert(
    sh: &Shell,
    project: &Project<'_>,
    topology: &Topology,
) -> anyhow::Result<()> {
    let container = Container {
        sh,
        name: format!("{}-no-client-cert", project.name),
    };
    let name = &container.name;
    let network = format!("{}_{}", project.name, topology.klaus_network);
    let volume = format!("{}_klaus-certs:/certs/klaus:ro", project.name);
    let petra_url = format!("PETRA_URL={}", topology.petra_url);
    cmd!(
        sh,
        "docker run -d --name {name} --network {network} --add-host host.docker.internal:host-gateway
            --read-only --cap-drop ALL --security-opt no-new-privileges:true
            -v {volume} -e {petra_url} -e PETRA_CA_FILE=/certs/klaus/ca.crt -p 127.0.0.1::8080 klaus:dev"
    )
    .quiet()
    .ignore_stdout()
    .run()
    .context("starting a Klaus without a client certificate failed")?;
    let published = cmd!(sh, "docker port {name} 8080/tcp").read()?;
    let addr: SocketAddr = published
        .lines()
        .find_map(|line| line.trim().parse().ok())
        .with_context(|| format!("cannot read the published port of {name} from {published:?}"))?;
    let reply = wait_for(STARTUP_DEADLINE, || get(addr, "/").ok())
        .context("the Klaus without a client certificate never answered")?;
    ensure!(
        reply.status == 502 && reply.body.contains("\"petra_tls_client_cert_required\""),
        "a Klaus without a client certificate got {} {:?}; Petra should have refused it for the missing certificate",
        reply.status,
        reply.body
    );
    pass(
        "Petra refuses a client without a certificate (Klaus reports petra_tls_client_cert_required)",
    );
    Ok(())
}

/// Calls Petra's published port from the host with curl: refused without a client certificate, `hello` with
/// Klaus's. The certificates are copied out of the project's volume for this and deleted afterwards.
fn curl_petra_directly(sh: &Shell, project: &Project<'_>, port: u16) -> anyhow::Result<()> {
    let dir = root()
        .join("target")
        .join(format!("{}-certs", project.name));
    remove_dir(&dir);
    let result = (|| {
        let holder = Container {
            sh,
            name: format!("{}-certs-copy", project.name),
        };
        let name = &holder.name;
        let volume = format!("{}_klaus-certs:/certs/klaus:ro", project.name);
        cmd!(sh, "docker create --name {name} -v {volume} petra:dev")
            .quiet()
            .ignore_stdout()
            .run()?;
        cmd!(sh, "docker cp {name}:/certs/klaus {dir}")
            .quiet()
            .run()?;
        let ca = dir.join("ca.crt");
        let cert = dir.join("tls.crt");
        let key = dir.join("tls.key");
        let url = format!("https://localhost:{port}/");

        let without = cmd!(sh, "curl -sS --max-time 5 --cacert {ca} {url}")
            .quiet()
            .ignore_status()
            .output()?;
        ensure!(
            !without.status.success(),
            "Petra answered a client without a certificate: {}",
            String::from_utf8_lossy(&without.stdout)
        );
        pass(&format!(
            "curl {url} without a client certificate is refused ({})",
            without.status
        ));

        let with = cmd!(
            sh,
            "curl -sS --max-time 5 --cacert {ca} --cert {cert} --key {key} {url}"
        )
        .quiet()
        .read()?;
        ensure!(
            with == "hello",
            "Petra answered {with:?} to Klaus's certificate, not \"hello\""
        );
        pass(&format!("curl {url} with Klaus's certificate gets `hello`"));
        Ok(())
    })();
    remove_dir(&dir);
    result
}

/// Removes a folder of copied keys, warning if that fails.
fn remove_dir(dir: &Path) {
    if dir.exists()
        && let Err(err) = std::fs::remove_dir_all(dir)
    {
        eprintln!("warning: removing {} failed: {err}", dir.display());
    }
}

/// Prints a passed check.
fn pass(what: &str) {
    println!("  ok: {what}");
}

/// Polls `probe` until it returns something or `deadline` has passed.
fn wait_for<T>(deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(found) = probe() {
            return Ok(found);
        }
        if Instant::now() >= end {
            bail!("gave up after {deadline:?}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// "a–b s" over some durations, or "a s" when they are all alike.
fn span(durations: &[Duration]) -> String {
    let secs = |d: &Duration| d.as_secs_f64();
    let min = durations.iter().map(secs).fold(f64::INFINITY, f64::min);
    let max = durations.iter().map(secs).fold(0.0, f64::max);
    if format!("{min:.2}") == format!("{max:.2}") {
        format!("{max:.2}s")
    } else {
        format!("{min:.2}–{max:.2}s")
    }
}
