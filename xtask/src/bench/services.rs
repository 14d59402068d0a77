//! Petra and Klaus as the bench runs them: their environment on loopback, started under a guard,
//! ready when `/readyz` answers 200; and the startup-to-ready measurement.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::Binaries;
use super::machine::Tools;
use super::options::Options;
use super::process::{Proc, free_ports, loopback};
use crate::http;

/// The environment of one service.
#[derive(Debug, Clone)]
pub(super) struct ServiceEnv {
    pub(super) name: &'static str,
    pub(super) vars: Vec<(&'static str, String)>,
    pub(super) admin: SocketAddr,
}

pub(super) fn petra_env(
    name: &'static str,
    certs: &Path,
    log: &str,
) -> anyhow::Result<(ServiceEnv, u16)> {
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

pub(super) fn klaus_env(
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
pub(super) fn spawn_service(
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
pub(super) fn wait_ready(
    proc: &mut Proc,
    admin: SocketAddr,
    since: Instant,
) -> anyhow::Result<Duration> {
    let deadline = since + Duration::from_secs(10);
    loop {
        if http::status(admin, "/readyz") == Some(200) {
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
pub(super) type Startup = BTreeMap<&'static str, Vec<f64>>;

/// Starts each service `runs` times and times process start to the first 200 from `/readyz`.
pub(super) fn startup(
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
