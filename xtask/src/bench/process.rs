//! The guard around every process a run starts, and the loopback ports they listen on.

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::procfs::{children_of, comm};

/// A process the task started. Dropping it kills it (an nginx master with its workers), so
/// nothing outlives the task, also when a step fails.
#[derive(Debug)]
pub(super) struct Proc {
    pub(super) name: &'static str,
    pub(super) child: Child,
    pub(super) nginx: bool,
    pub(super) stderr: PathBuf,
}

impl Proc {
    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the process's stderr when it has exited.
    pub(super) fn check_running(&mut self) -> anyhow::Result<()> {
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

/// Free loopback ports, all distinct (each listener is held until all are picked).
pub(super) fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("picking free loopback ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

pub(super) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}
