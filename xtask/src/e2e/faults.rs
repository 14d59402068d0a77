//! The fault scenarios of `cargo xtask e2e`, in the single-network topology (docker-compose.yml)
//! with two Petra replicas behind the one name `petra`: a rolling restart under steady load, a
//! partition between Klaus and Petra, and an overload burst of 2,000 connections whose goodput
//! is held against Klaus's rate at 64 connections.
//!
//! The load comes from oha on the host and goes to Klaus's address on the project's own network,
//! so that docker-proxy is not in the path; Klaus's metrics are read from its admin port at the
//! same address. Every wait polls a condition under a deadline; the only fixed durations are the
//! load runs themselves.
//!
//! Each scenario is a module of its own: [`rolling`], [`partition`], [`overload`].

mod overload;
pub(super) mod partition;
mod rolling;

use std::time::Instant;

use anyhow::{Context, ensure};
use xshell::Shell;

use super::containers::{HEALTHY_DEADLINE, Klaus, short, state};
use super::{KLAUS_PORT, Project, ensure_port_free, pass, wait_for};
use crate::oha::Oha;

/// The compose file the scenarios run on.
const FILE: &str = "docker-compose.yml";

/// Petra replicas behind the name `petra`.
const REPLICAS: usize = 2;

/// Brings docker-compose.yml up with two Petra replicas under a project name of its own, runs
/// the three scenarios, prints the logs if one fails, and tears it down.
pub(super) fn run(sh: &Shell, compose: &[String], oha: &Oha) -> anyhow::Result<()> {
    ensure_port_free(KLAUS_PORT)?;
    let project = Project {
        sh,
        compose,
        name: format!("pk-e2e-{}-faults", std::process::id()),
        file: FILE,
    };
    project.run(&["up", "-d", "--scale", &format!("petra={REPLICAS}")])?;
    let result = scenarios(sh, &project, oha);
    if result.is_err() {
        let _ = project.run(&["logs", "--no-color", "--tail", "40"]);
    }
    result
}

/// Waits for the replicas and Klaus, then runs the scenarios; the overload comes last because
/// it recreates Klaus with a lower concurrency limit.
fn scenarios(sh: &Shell, project: &Project<'_>, oha: &Oha) -> anyhow::Result<()> {
    let started = Instant::now();
    let replicas = project.containers("petra")?;
    ensure!(
        replicas.len() == REPLICAS,
        "`up --scale petra={REPLICAS}` made {} Petra containers",
        replicas.len()
    );
    for id in &replicas {
        wait_for(HEALTHY_DEADLINE, || {
            state(sh, id).ok().filter(|s| s.health == "healthy")
        })
        .with_context(|| format!("Petra replica {} never became healthy", short(id)))?;
    }
    let klaus = Klaus::answering(sh, project)?;
    pass(&format!(
        "{REPLICAS} Petra replicas healthy, Klaus answers 200 at {} ({:.1}s after up)",
        klaus.main,
        started.elapsed().as_secs_f64()
    ));

    rolling::run(sh, project, oha, &klaus)?;
    partition::run(sh, project, &klaus)?;
    overload::run(sh, project, oha)
}
