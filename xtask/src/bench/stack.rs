//! Everything under test at once: Petra and Klaus at two log levels and the nginx pair, grouped
//! by the processes whose CPU time and memory a request costs.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Binaries;
use super::machine::Tools;
use super::nginx;
use super::process::{Proc, free_ports, loopback};
use super::services::{ServiceEnv, klaus_env, petra_env, spawn_service, wait_ready};
use crate::procfs::{self, children_of};

/// Processes whose CPU and memory are measured together under one name.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub(super) pids: Vec<u32>,
}

impl Group {
    pub(super) fn cpu_ticks(&self) -> anyhow::Result<u64> {
        self.pids.iter().map(|&pid| procfs::cpu_ticks(pid)).sum()
    }

    pub(super) fn rss_kib(&self, key: &str) -> u64 {
        self.pids
            .iter()
            .filter_map(|&pid| procfs::status_kib(pid, key))
            .sum()
    }
}

/// Everything under test, running: Petra and Klaus (at `info` and at `warn`) and the nginx
/// pair. Dropping it stops them all.
#[derive(Debug)]
pub(super) struct Stack {
    pub(super) groups: BTreeMap<&'static str, Group>,
    pub(super) urls: BTreeMap<&'static str, String>,
    pub(super) procs: Vec<Proc>,
}

/// The group names: our services by role and log level, and the two nginx instances.
pub(super) const PETRA: &str = "petra";
pub(super) const KLAUS_HTTPS: &str = "klaus-https";
pub(super) const KLAUS_HTTP: &str = "klaus-http";
pub(super) const PETRA_WARN: &str = "petra-warn";
pub(super) const KLAUS_WARN: &str = "klaus-https-warn";
pub(super) const NGINX_PETRA: &str = "nginx-petra";
pub(super) const NGINX_KLAUS: &str = "nginx-klaus";
pub(super) const NGINX_KLAUS_HTTPS: &str = "nginx-klaus-https";
pub(super) const NGINX_KLAUS_HTTP: &str = "nginx-klaus-http";

impl Stack {
    pub(super) fn start(
        bins: &Binaries,
        tools: &Tools,
        certs: &Path,
        out: &Path,
    ) -> anyhow::Result<Self> {
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

    pub(super) fn start_service(
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
    pub(super) fn start_nginx(
        &mut self,
        tools: &Tools,
        certs: &Path,
        out: &Path,
    ) -> anyhow::Result<()> {
        let ports = free_ports(3)?;
        let (petra_port, https_port, http_port) = (ports[0], ports[1], ports[2]);
        let petra_conf = nginx::petra_conf(petra_port, certs);
        let klaus_conf = nginx::klaus_conf(https_port, http_port, petra_port, certs);
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
    pub(super) fn sanity_check(&self, tools: &Tools, certs: &Path) -> anyhow::Result<()> {
        for (target, url) in &self.urls {
            let want = if target.contains("petra") {
                "hello"
            } else {
                "hello world"
            };
            let output = tools
                .oha
                .command()
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
    pub(super) fn all_cpu_ticks(&self) -> anyhow::Result<u64> {
        self.groups.values().map(Group::cpu_ticks).sum()
    }

    pub(super) fn group(&self, name: &str) -> anyhow::Result<&Group> {
        self.groups
            .get(name)
            .with_context(|| format!("no process group {name}"))
    }

    /// Resident memory of each of our services now, in MiB.
    pub(super) fn idle_rss(&self) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        self.rss_of("VmRSS")
    }

    /// The peak resident memory of each service over its life (`VmHWM`), in MiB.
    pub(super) fn peak_rss(&self) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        self.rss_of("VmHWM")
    }

    pub(super) fn rss_of(&self, key: &str) -> anyhow::Result<BTreeMap<&'static str, f64>> {
        let mut rss = BTreeMap::new();
        for (&name, group) in &self.groups {
            rss.insert(name, group.rss_kib(key) as f64 / 1024.0);
        }
        Ok(rss)
    }
}
