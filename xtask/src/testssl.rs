//! The testssl.sh check of `cargo xtask audit`: a Petra on loopback, with certificates from
//! `petra certs` and the manifests' TLS settings, scanned by testssl.sh (Debian's `testssl.sh`
//! package, installed when missing) with the private CA added to its trust stores. It passes only
//! when TLS 1.3 is the one protocol offered and no finding is rated above LOW.
//!
//! Debian 12's testssl.sh (3.0.8) has no `--mtls`: it scans without a client certificate, which
//! Petra's handshake tolerates up to the certificate request, so protocols, ciphers, the server's
//! certificate and the TLS vulnerabilities are all checked; only the HTTP-level checks (headers,
//! BREACH) are skipped, as testssl.sh says for every server that requires client authentication.
//! A testssl.sh with `--mtls` gets Klaus's certificate and runs those too.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use xshell::{Shell, cmd};

use crate::util::root;

/// How long Petra may take to start serving.
const STARTUP: Duration = Duration::from_secs(30);

/// Severities testssl.sh gives findings, lowest first; a scan passes with none above LOW.
const ACCEPTED: &[&str] = &["DEBUG", "INFO", "OK", "LOW"];

/// Findings rated above LOW that judge the Web PKI rather than this TLS setup, each with the
/// reason it does not apply to a private CA whose only relying parties are Petra and Klaus.
const NOT_APPLICABLE: &[(&str, &str)] = &[(
    "cert_revocation",
    "no CRL or OCSP URI: the private CA's certificates live 90 days and are replaced by rotation \
     (TLS_RELOAD_INTERVAL_SECONDS); there is no revocation service to point to",
)];

/// The protocols testssl.sh reports on, and whether Petra may offer each.
const PROTOCOLS: &[(&str, bool)] = &[
    ("SSLv2", false),
    ("SSLv3", false),
    ("TLS1", false),
    ("TLS1_1", false),
    ("TLS1_2", false),
    ("TLS1_3", true),
];

/// `cargo xtask testssl`: the audit's testssl.sh check alone.
pub(crate) fn run() -> anyhow::Result<()> {
    let sh = crate::util::shell()?;
    let work = root().join("target").join("audit");
    crate::util::step("testssl.sh against Petra", || testssl(&sh, &work))
}

/// Scans a Petra started from `cargo build` with testssl.sh; scratch files go under `work`.
pub(crate) fn testssl(sh: &Shell, work: &Path) -> anyhow::Result<()> {
    let testssl = ensure_testssl(sh)?;
    let dir = work.join("testssl");
    // A fresh folder: old certificates or reports must not decide this run.
    let _ = std::fs::remove_dir_all(&dir);
    sh.create_dir(&dir)?;
    let petra = build_petra(sh)?;
    let certs = dir.join("certs");
    cmd!(sh, "{petra} certs --out {certs}")
        .quiet()
        .ignore_stdout()
        .run()
        .context("`petra certs` failed")?;
    // testssl.sh's --mtls takes one file with the certificate and its key.
    let client = dir.join("klaus.pem");
    let klaus = certs.join("klaus");
    let pem = std::fs::read_to_string(klaus.join("tls.crt"))?
        + &std::fs::read_to_string(klaus.join("tls.key"))?;
    write_private(&client, &pem)?;

    let mtls = supports_mtls(sh, &testssl);
    let setup = Setup {
        testssl,
        petra,
        certs,
        client,
        mtls,
        dir,
    };
    if !mtls {
        println!(
            "testssl.sh: this version has no --mtls; scanning without a client certificate (HTTP-level checks skipped)"
        );
    }
    // A scan warning (WARN: testssl.sh could not connect for one check, as happens on a loaded
    // machine) earns one more scan; a real finding does not.
    let mut attempt = 1;
    let (target, findings, json) = loop {
        let (target, findings, json) = setup.scan(sh, attempt)?;
        let warned = findings.iter().any(|f| f.severity == "WARN");
        if !warned || attempt == 2 {
            break (target, findings, json);
        }
        println!("testssl.sh: the scan had warnings; scanning once more");
        attempt += 1;
    };
    let problems = judge(&findings);
    println!(
        "testssl.sh: {} findings on {target}, report in {}",
        findings.len(),
        json.display()
    );
    for f in &findings {
        if let Some((_, why)) = NOT_APPLICABLE.iter().find(|(id, _)| *id == f.id) {
            println!(
                "testssl.sh: {} [{}] not applicable: {why}",
                f.id, f.severity
            );
        }
    }
    if !problems.is_empty() {
        bail!("testssl.sh found:\n  {}", problems.join("\n  "));
    }
    println!("testssl.sh: only TLS 1.3 offered, no finding above LOW");
    Ok(())
}

/// What a scan needs: the tools, Petra's binary, the certificates and where the report goes.
struct Setup {
    testssl: String,
    petra: PathBuf,
    certs: PathBuf,
    /// Klaus's certificate and key in one file, for `--mtls`.
    client: PathBuf,
    /// Whether testssl.sh has `--mtls`.
    mtls: bool,
    dir: PathBuf,
}

impl Setup {
    /// Starts Petra, scans it once, stops it; returns the address, the findings and the report.
    fn scan(&self, sh: &Shell, attempt: u32) -> anyhow::Result<(String, Vec<Finding>, PathBuf)> {
        let Self {
            testssl,
            petra,
            certs,
            client,
            mtls,
            dir,
        } = self;
        let mut server = Petra::start(petra, certs)?;
        let json = dir.join(format!("testssl-{attempt}.json"));
        let target = format!("{}", server.addr);
        let ca = certs.join("ca.crt");
        let mut options = vec!["--add-ca".to_owned(), ca.display().to_string()];
        if *mtls {
            options.extend(["--mtls".to_owned(), client.display().to_string()]);
        }
        let scan = cmd!(
        sh,
        "{testssl} --quiet --color 0 --warnings off --ip one {options...} --jsonfile {json} {target}"
    )
    .ignore_status()
    .output();
        server.stop();
        let scan = scan.context("running testssl.sh failed")?;
        ensure!(
            json.is_file(),
            "testssl.sh wrote no {} ({}): {}",
            json.display(),
            scan.status,
            String::from_utf8_lossy(&scan.stderr)
        );
        let findings = parse(&std::fs::read_to_string(&json)?)?;
        Ok((target, findings, json))
    }
}

/// One entry of testssl.sh's JSON report.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Finding {
    id: String,
    severity: String,
    finding: String,
}

/// Reads testssl.sh's `--jsonfile` output: an array of objects with `id`, `severity` and
/// `finding`.
fn parse(json: &str) -> anyhow::Result<Vec<Finding>> {
    let value: serde_json::Value =
        serde_json::from_str(json).context("testssl.sh's JSON report does not parse")?;
    let entries = value
        .as_array()
        .context("testssl.sh's JSON report is not an array")?;
    let text =
        |entry: &serde_json::Value, key: &str| entry[key].as_str().unwrap_or_default().to_owned();
    Ok(entries
        .iter()
        .map(|entry| Finding {
            id: text(entry, "id"),
            severity: text(entry, "severity"),
            finding: text(entry, "finding"),
        })
        .collect())
}

/// What is wrong with a scan: a protocol offered or not as it should be, a protocol not reported
/// at all, a finding rated above LOW (or one testssl.sh could not rate, such as a scan error).
fn judge(findings: &[Finding]) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, wanted) in PROTOCOLS {
        match findings.iter().find(|f| f.id == *id) {
            None => problems.push(format!("{id}: not in the report")),
            Some(f) => {
                let offered = f.finding.starts_with("offered");
                if offered != *wanted {
                    problems.push(format!(
                        "{id}: {} (expected {})",
                        f.finding,
                        if *wanted { "offered" } else { "not offered" }
                    ));
                }
            }
        }
    }
    for f in findings {
        let excused = NOT_APPLICABLE.iter().any(|(id, _)| *id == f.id);
        if !ACCEPTED.contains(&f.severity.as_str()) && !excused {
            problems.push(format!("{} [{}]: {}", f.id, f.severity, f.finding));
        }
    }
    problems
}

/// The testssl.sh command, installed from Debian's package (`testssl.sh`, whose command is
/// `testssl`) when it is missing.
fn ensure_testssl(sh: &Shell) -> anyhow::Result<String> {
    let works = |program: &str| {
        cmd!(sh, "{program} --version")
            .quiet()
            .ignore_stdout()
            .ignore_stderr()
            .run()
            .is_ok()
    };
    for program in ["testssl", "testssl.sh"] {
        if works(program) {
            return Ok(program.to_owned());
        }
    }
    cmd!(sh, "apt-get update").quiet().ignore_stdout().run()?;
    cmd!(sh, "apt-get install -y testssl.sh")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .quiet()
        .ignore_stdout()
        .run()
        .context("apt-get install testssl.sh failed")?;
    ensure!(
        works("testssl"),
        "testssl.sh is installed but `testssl --version` fails"
    );
    Ok("testssl".to_owned())
}

/// Whether this testssl.sh can present a client certificate (`--mtls`, from 3.1).
fn supports_mtls(sh: &Shell, testssl: &str) -> bool {
    cmd!(sh, "{testssl} --help")
        .quiet()
        .ignore_status()
        .ignore_stderr()
        .read()
        .is_ok_and(|help| help.contains("--mtls"))
}

/// Builds Petra (debug) and returns its path.
fn build_petra(sh: &Shell) -> anyhow::Result<PathBuf> {
    cmd!(sh, "cargo build --quiet --locked --package petra")
        .run()
        .context("building petra failed")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"));
    let petra = target.join("debug").join("petra");
    ensure!(petra.is_file(), "cargo build left no {}", petra.display());
    Ok(petra)
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}

/// A Petra process on loopback ports it picked itself, as the manifests run it: mutual TLS,
/// Klaus's identity only, the default TLS versions. Killed on drop.
struct Petra {
    child: Child,
    addr: SocketAddr,
}

impl Petra {
    fn start(petra: &Path, certs: &Path) -> anyhow::Result<Self> {
        let file = |name: &str| certs.join(name);
        let mut child = Command::new(petra)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("ADMIN_ADDR", "127.0.0.1:0")
            .env("TLS_CERT_FILE", file("petra/tls.crt"))
            .env("TLS_KEY_FILE", file("petra/tls.key"))
            .env("TLS_CLIENT_CA_FILE", file("petra/ca.crt"))
            .env(
                "TLS_CLIENT_ALLOWED_NAMES",
                "spiffe://petra-klaus/ns/petra-klaus/sa/klaus",
            )
            .env("LOG_FORMAT", "json")
            .env("SHUTDOWN_DELAY_SECONDS", "0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", petra.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (lines, received) = mpsc::channel();
        // Reads the log to the end, so that Petra never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let deadline = std::time::Instant::now() + STARTUP;
        loop {
            let line = received
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .context("Petra did not start serving")?;
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if event["message"] == "serving"
                && let Some(addr) = event["main_addr"].as_str().and_then(|a| a.parse().ok())
            {
                server.addr = addr;
                return Ok(server);
            }
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Petra {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(id: &str, severity: &str, finding: &str) -> Finding {
        Finding {
            id: id.to_owned(),
            severity: severity.to_owned(),
            finding: finding.to_owned(),
        }
    }

    fn clean() -> Vec<Finding> {
        let mut findings: Vec<Finding> = PROTOCOLS
            .iter()
            .map(|(id, offered)| {
                finding(
                    id,
                    if *offered { "OK" } else { "INFO" },
                    if *offered {
                        "offered with final"
                    } else {
                        "not offered"
                    },
                )
            })
            .collect();
        findings.push(finding("BREACH", "LOW", "potentially NOT ok"));
        findings.push(finding(
            "cert_revocation",
            "HIGH",
            "Neither CRL nor OCSP URI provided",
        ));
        findings
    }

    #[test]
    fn a_tls_1_3_only_scan_with_low_findings_passes() {
        assert_eq!(judge(&clean()), Vec::<String>::new());
    }

    #[test]
    fn tls_1_2_offered_or_a_medium_finding_fails() {
        let mut findings = clean();
        findings[4] = finding("TLS1_2", "OK", "offered");
        findings.push(finding("LUCKY13", "MEDIUM", "potentially vulnerable"));
        let problems = judge(&findings);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("TLS1_2"), "{problems:?}");
        assert!(problems[1].contains("MEDIUM"), "{problems:?}");
        findings.retain(|f| f.id != "TLS1_3");
        assert!(
            judge(&findings)
                .iter()
                .any(|p| p.contains("TLS1_3: not in"))
        );
    }

    #[test]
    fn the_report_parses() {
        let json = r#"[{"id":"TLS1_3","ip":"127.0.0.1/127.0.0.1","port":"8443","severity":"OK","finding":"offered with final"}]"#;
        assert_eq!(
            parse(json).expect("parses"),
            [finding("TLS1_3", "OK", "offered with final")]
        );
        assert!(parse("{}").is_err());
    }
}
