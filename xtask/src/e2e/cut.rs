//! The partition's guard: DROP rules inserted with iptables in the network namespaces of some
//! containers' processes, and always taken out again.

use anyhow::Context;
use xshell::{Shell, cmd};

/// The rules a [`Cut`] inserts in each Petra replica's network namespace: every packet in
/// or out is dropped, as on a dead link, and nothing is refused or reset. Loopback stays open,
/// so Petra's health check keeps passing.
const CUT_RULES: [[&str; 6]; 2] = [
    ["INPUT", "!", "-i", "lo", "-j", "DROP"],
    ["OUTPUT", "!", "-o", "lo", "-j", "DROP"],
];

/// [`CUT_RULES`] inserted in the network namespace of each process in `pids` (run on the host
/// with nsenter and iptables); taken out by [`Cut::restore`], or on drop.
pub(super) struct Cut<'a> {
    sh: &'a Shell,
    pids: Vec<u32>,
    active: bool,
}

impl<'a> Cut<'a> {
    pub(super) fn new(sh: &'a Shell, pids: Vec<u32>) -> anyhow::Result<Self> {
        let mut cut = Self {
            sh,
            pids: Vec::new(),
            active: true,
        };
        for pid in pids {
            iptables(sh, pid, "-I")?;
            cut.pids.push(pid);
        }
        Ok(cut)
    }

    pub(super) fn restore(&mut self) -> anyhow::Result<()> {
        self.active = false;
        for &pid in &self.pids {
            iptables(self.sh, pid, "-D")?;
        }
        Ok(())
    }
}

impl Drop for Cut<'_> {
    fn drop(&mut self) {
        if self.active
            && let Err(err) = self.restore()
        {
            eprintln!("warning: taking the partition's DROP rule out failed: {err:#}");
        }
    }
}

/// Inserts (`-I`) or deletes (`-D`) [`CUT_RULES`] in the network namespace of `pid`.
fn iptables(sh: &Shell, pid: u32, op: &str) -> anyhow::Result<()> {
    let pid = pid.to_string();
    for rule in CUT_RULES {
        cmd!(sh, "nsenter -t {pid} -n iptables -w {op} {rule...}")
            .quiet()
            .run()
            .with_context(|| {
                format!("iptables {op} in the network namespace of PID {pid} failed (needs root, nsenter and iptables)")
            })?;
    }
    Ok(())
}
