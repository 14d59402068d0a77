//! The containers the e2e scenarios look into: Klaus's (its addresses, environment and metrics)
//! and any container's state, as `docker inspect` reports them.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use super::{KLAUS_PORT, Project, STARTUP_DEADLINE, wait_for};
use crate::http::get;
use crate::prometheus::{scrape, sum_samples};

/// The admin port (/metrics) inside Klaus's and Petra's containers.
pub(super) const ADMIN_PORT: u16 = 9090;

/// How long a started replica may take to be healthy; compose checks every 2 s.
pub(super) const HEALTHY_DEADLINE: Duration = Duration::from_secs(30);

/// Klaus's PETRA_TIMEOUT_MS when its container does not set it, as docker-compose.yml does not
/// (the default in klaus/src/upstream/config.rs).
const DEFAULT_PETRA_TIMEOUT_MS: u64 = 2000;

/// Klaus's container and its two listeners, at its address on the project's network.
pub(super) struct Klaus {
    pub(super) id: String,
    pub(super) main: SocketAddr,
    pub(super) admin: SocketAddr,
}

impl Klaus {
    pub(super) fn find(sh: &Shell, project: &Project<'_>) -> anyhow::Result<Self> {
        let ids = project.containers("klaus")?;
        let [id] = ids.as_slice() else {
            bail!("expected one Klaus container, found {}", ids.len());
        };
        let ip = container_ip(sh, id)?;
        Ok(Self {
            id: id.clone(),
            main: SocketAddr::new(ip, KLAUS_PORT),
            admin: SocketAddr::new(ip, ADMIN_PORT),
        })
    }

    /// [`Klaus::find`], then waits until Klaus answers `GET /` with 200 (within
    /// [`STARTUP_DEADLINE`] of `up -d`).
    pub(super) fn answering(sh: &Shell, project: &Project<'_>) -> anyhow::Result<Self> {
        let klaus = Self::find(sh, project)?;
        wait_for(STARTUP_DEADLINE, || {
            get(klaus.main, "/").ok().filter(|r| r.status == 200)
        })
        .with_context(|| format!("Klaus at {} did not answer 200 after `up -d`", klaus.main))?;
        Ok(klaus)
    }

    pub(super) fn url(&self) -> String {
        format!("http://{}/", self.main)
    }

    /// The value of `name` in Klaus's container environment, if it is set.
    pub(super) fn env(&self, sh: &Shell, name: &str) -> anyhow::Result<Option<String>> {
        let id = &self.id;
        let format = "{{json .Config.Env}}";
        let json = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
        let vars: Vec<String> = serde_json::from_str(&json).context("parsing Config.Env")?;
        Ok(vars.iter().find_map(|var| {
            var.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }))
    }

    /// Klaus's deadline for calls to Petra.
    pub(super) fn petra_timeout(&self, sh: &Shell) -> anyhow::Result<Duration> {
        let ms = match self.env(sh, "PETRA_TIMEOUT_MS")? {
            Some(ms) => ms
                .parse()
                .context("Klaus's PETRA_TIMEOUT_MS is not a number")?,
            None => DEFAULT_PETRA_TIMEOUT_MS,
        };
        Ok(Duration::from_millis(ms))
    }

    /// The sum of the samples of `name` that carry every one of `labels` (`key="value"`), from
    /// Klaus's /metrics.
    pub(super) fn metric(&self, name: &str, labels: &[&str]) -> anyhow::Result<f64> {
        Ok(sum_samples(&scrape(self.admin)?, name, labels))
    }

    /// The share of Klaus's answers with `status` that took at most `le` seconds, from its
    /// latency histogram.
    pub(super) fn share_within(&self, status: &str, le: &str) -> anyhow::Result<f64> {
        let status = format!("status=\"{status}\"");
        let total = self.metric("http_request_duration_seconds_count", &[&status])?;
        let within = self.metric(
            "http_request_duration_seconds_bucket",
            &[&status, &format!("le=\"{le}\"")],
        )?;
        Ok(if total > 0.0 { within / total } else { 0.0 })
    }
}

/// The address of a container on its (first) network, as the host reaches it.
pub(super) fn container_ip(sh: &Shell, id: &str) -> anyhow::Result<IpAddr> {
    let format = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}";
    let addresses = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
    addresses
        .split_whitespace()
        .find_map(|ip| ip.parse().ok())
        .with_context(|| format!("container {} has no IP address ({addresses:?})", short(id)))
}

/// What `docker inspect` says about a container.
#[derive(Debug)]
pub(super) struct State {
    pub(super) status: String,
    pub(super) exit_code: i64,
    pub(super) oom_killed: bool,
    pub(super) restarts: u64,
    pub(super) pid: u32,
    pub(super) health: String,
    pub(super) memory_limit: u64,
}

/// Reads a container's [`State`].
pub(super) fn state(sh: &Shell, id: &str) -> anyhow::Result<State> {
    let format = "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}} {{.RestartCount}} \
                  {{.State.Pid}} {{.HostConfig.Memory}} {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}";
    let line = cmd!(sh, "docker inspect -f {format} {id}").quiet().read()?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [
        status,
        exit_code,
        oom_killed,
        restarts,
        pid,
        memory_limit,
        health,
    ] = fields[..]
    else {
        bail!("unexpected docker inspect output {line:?}");
    };
    Ok(State {
        status: status.to_owned(),
        exit_code: exit_code.parse()?,
        oom_killed: oom_killed == "true",
        restarts: restarts.parse()?,
        pid: pid.parse()?,
        health: health.to_owned(),
        memory_limit: memory_limit.parse()?,
    })
}

/// The first 12 characters of a container ID, as docker prints it.
pub(super) fn short(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}
