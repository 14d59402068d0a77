//! The tools a run needs (oha, nginx) and the machine it runs on: cores, CPU, kernel and load.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use xshell::{Shell, cmd};

use crate::oha::Oha;
use crate::procfs;
use crate::tools::{existing, which};
use crate::util::with_nofile;

/// The load generator and the reference server, installed when missing.
#[derive(Debug)]
pub(super) struct Tools {
    /// oha, with the file-descriptor limit to raise children to when the inherited one is too
    /// low for 512 connections.
    pub(super) oha: Oha,
    pub(super) nginx: PathBuf,
}

impl Tools {
    pub(super) fn find(sh: &Shell) -> anyhow::Result<Self> {
        let oha = Oha::find(sh)?;
        let nginx = match which("nginx").or_else(|| existing(PathBuf::from("/usr/sbin/nginx"))) {
            Some(nginx) => nginx,
            None => {
                install_nginx(sh)?;
                which("nginx")
                    .or_else(|| existing(PathBuf::from("/usr/sbin/nginx")))
                    .context("nginx is still missing after installing nginx-light")?
            }
        };
        Ok(Self { oha, nginx })
    }

    /// A command that runs `program` with the raised file-descriptor limit, keeping its PID
    /// (the shell `exec`s it).
    pub(super) fn command(&self, program: &Path) -> Command {
        with_nofile(program, self.oha.nofile())
    }
}

fn install_nginx(sh: &Shell) -> anyhow::Result<()> {
    println!("nginx is missing: apt-get install -y nginx-light");
    let (program, prefix): (&str, &[&str]) = if procfs::is_root()? {
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

/// The machine the run is on, and how busy it was.
#[derive(Debug)]
pub(super) struct Machine {
    pub(super) cores: u64,
    pub(super) cpu: String,
    pub(super) kernel: String,
    pub(super) date: String,
    pub(super) load_before: String,
    pub(super) load_after: String,
    pub(super) oha: String,
    pub(super) nginx: String,
    pub(super) clk_tck: u64,
}

impl Machine {
    pub(super) fn read(sh: &Shell, tools: &Tools) -> anyhow::Result<Self> {
        let cpu = procfs::cpu_model()?;
        let (oha, nginx) = (tools.oha.path(), &tools.nginx);
        let nginx_version = cmd!(sh, "{nginx} -v").quiet().ignore_stdout().output()?;
        Ok(Self {
            cores: cmd!(sh, "nproc").quiet().read()?.parse().context("nproc")?,
            cpu,
            kernel: cmd!(sh, "uname -sr").quiet().read()?,
            date: cmd!(sh, "date -u +%Y-%m-%dT%H:%MZ").quiet().read()?,
            load_before: procfs::load_average()?,
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
    pub(super) fn busy(&self) -> bool {
        let one_minute: f64 = self
            .load_before
            .split_whitespace()
            .next()
            .and_then(|l| l.parse().ok())
            .unwrap_or(0.0);
        one_minute > 0.5 * self.cores as f64
    }

    pub(super) fn finish(mut self) -> anyhow::Result<Self> {
        self.load_after = procfs::load_average()?;
        Ok(self)
    }
}
