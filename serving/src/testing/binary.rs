//! A service binary started by a test: its addresses read from its `serving` log line, signals,
//! and its exit; and configuration errors checked against the binary.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::client::{metrics_at, plain_client};
use super::wait::wait_until;

/// A service binary started by a test, with the addresses it logged when it began serving.
#[derive(Debug)]
pub struct Binary {
    /// The process.
    pub child: std::process::Child,
    /// The main listener's address, from the `serving` log line.
    pub main_addr: SocketAddr,
    /// The admin listener's address, from the `serving` log line.
    pub admin_addr: SocketAddr,
    /// Every stdout line after the `serving` one, as it arrives.
    pub lines: std::sync::mpsc::Receiver<String>,
}

impl Binary {
    /// The command [`Binary::start`] runs: `exe` with only `env`, JSON logs on a piped stdout and
    /// both listeners on free loopback ports. For a test that must read stdout itself.
    pub fn command(exe: &str, env: &[(&str, &str)]) -> std::process::Command {
        let mut command = std::process::Command::new(exe);
        command
            .env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        command
    }

    /// Starts `exe` with JSON logs, both listeners on free loopback ports and `env`, and waits
    /// for its `serving` log line.
    pub fn start(exe: &str, env: &[(&str, &str)]) -> Self {
        Self::try_start(exe, env)
            .unwrap_or_else(|| panic!("{exe} did not log `serving` within 20 s"))
    }

    /// [`Binary::start`], tried again every 100 ms for up to `within` while the binary exits
    /// without serving: for a restart on a port that another socket may hold for a moment (a
    /// killed process's connections closing, a client's ephemeral port).
    pub fn start_within(exe: &str, env: &[(&str, &str)], within: Duration) -> Self {
        let deadline = Instant::now() + within;
        loop {
            if let Some(binary) = Self::try_start(exe, env) {
                return binary;
            }
            assert!(
                Instant::now() < deadline,
                "{exe} did not start serving within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Binary::start`], or `None` when the binary exited or did not log `serving` within
    /// 20 s (it is then killed).
    pub fn try_start(exe: &str, env: &[(&str, &str)]) -> Option<Self> {
        use std::io::BufRead;
        let mut child = Self::command(exe, env).spawn().expect("start the binary");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        match serving_addrs(&lines, Duration::from_secs(20)) {
            Some((main_addr, admin_addr)) => Some(Self {
                child,
                main_addr,
                admin_addr,
                lines,
            }),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        }
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`) with `kill(1)`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits up to `timeout` for the process to exit and returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `http://ADMIN_ADDR{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The text of `/metrics` on the admin port.
    pub async fn metrics(&self) -> String {
        metrics_at(self.admin_addr).await
    }

    /// Waits up to 5 s until `/readyz` answers 503, as it does from the moment shutdown begins.
    pub async fn wait_unready(&self) {
        let readyz = self.admin_url("/readyz");
        wait_until("/readyz answers 503", Duration::from_secs(5), || async {
            plain_client()
                .get(&readyz)
                .send()
                .await
                .is_ok_and(|r| r.status().as_u16() == 503)
        })
        .await;
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads log lines until the `serving` one and returns the main and admin addresses it names.
fn serving_addrs(
    lines: &std::sync::mpsc::Receiver<String>,
    timeout: Duration,
) -> Option<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()?;
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "serving" {
            let addr = |key: &str| event[key].as_str().and_then(|s| s.parse().ok());
            return Some((addr("main_addr")?, addr("admin_addr")?));
        }
    }
}

/// Runs `exe` once per case with the case's environment and checks that it exits 2 with one
/// line on stderr that contains the case's expected text and no panic.
pub fn assert_config_errors(exe: &str, cases: &[(&[(&str, &str)], &str)]) {
    for (env, expected) in cases {
        let (code, stderr) = run_to_exit(exe, env);
        assert_eq!(code, Some(2), "{env:?} should exit 2; stderr: {stderr}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "{env:?}: one line expected, got: {stderr}"
        );
        assert!(stderr.starts_with("error: "), "{env:?}: {stderr}");
        assert!(
            stderr.contains(expected),
            "{env:?}: expected {expected:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{env:?}: {stderr}");
    }
}

/// Runs `exe` with `env` (and nothing else from the environment) and returns its exit code
/// and stderr, for configuration errors.
pub fn run_to_exit(exe: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = std::process::Command::new(exe)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
