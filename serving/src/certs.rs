//! The certificate tool: a private CA, Petra's server certificate and Klaus's client
//! certificate, written in the layout of a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`,
//! `ca.crt`) so that the same folder serves docker compose and a kustomize secretGenerator.
//!
//! ```text
//! OUT/ca.crt  OUT/ca.key
//! OUT/petra/{tls.crt,tls.key,ca.crt}   server certificate: petra, petra.NS.svc, ... + --san
//! OUT/klaus/{tls.crt,tls.key,ca.crt}   client certificate for mutual TLS
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// What a leaf certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    /// A TLS server (Petra, or Klaus's front).
    Server,
    /// A TLS client (Klaus calling Petra).
    Client,
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

/// A certificate authority that can issue leaf certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new self-signed CA valid for ten years.
    pub fn new(common_name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Loads a CA written earlier, so that new leaf certificates chain to the trust anchor the
    /// services already have.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        let cert = params.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// The CA certificate and key.
    pub fn pem(&self) -> Pem {
        Pem {
            cert: self.cert.pem(),
            key: self.key.serialize_pem(),
        }
    }

    /// Issues a leaf certificate for `names` (DNS names or IP addresses; the first is also the
    /// common name), valid from `not_before` to `not_after`.
    pub fn issue(
        &self,
        names: &[String],
        usage: Usage,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Pem, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
        }];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    }

    /// Issues a leaf certificate valid from an hour ago for `days` days.
    pub fn issue_for_days(
        &self,
        names: &[String],
        usage: Usage,
        days: i64,
    ) -> Result<Pem, rcgen::Error> {
        let now = OffsetDateTime::now_utc();
        self.issue(
            names,
            usage,
            now - Duration::hours(1),
            now + Duration::days(days),
        )
    }
}

/// The names Petra's certificate carries for `namespace`, plus `extra`.
pub fn petra_names(namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "petra".to_owned(),
        format!("petra.{namespace}.svc"),
        format!("petra.{namespace}.svc.cluster.local"),
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
    ];
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Options of the certificate tool.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Folder to write into (created when missing).
    #[arg(long, default_value = "certs")]
    pub out: PathBuf,
    /// Kubernetes namespace for Petra's service names (petra.NAMESPACE.svc, ...).
    #[arg(long, default_value = "petra-klaus")]
    pub namespace: String,
    /// More names for Petra's certificate (DNS name or IP address), e.g. an external load
    /// balancer's name; repeat for several.
    #[arg(long = "san", value_name = "NAME")]
    pub sans: Vec<String>,
    /// Validity of the service certificates, in days (at most the CA's ten years).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(i64).range(1..=3650))]
    pub days: i64,
    /// Replace existing service keys and certificates (the CA is kept, so rotation needs no
    /// new trust anchor).
    #[arg(long)]
    pub force: bool,
    /// Also replace the CA. Services must then get the new ca.crt too.
    #[arg(long)]
    pub new_ca: bool,
}

/// What [`write`] did, for the operator.
#[derive(Debug, Default)]
pub struct Report {
    /// One line per file or folder written or kept.
    pub lines: Vec<String>,
}

/// Writes the CA and both service identities into `args.out`. Existing keys are kept unless
/// `force` (service keys) or `new_ca` (the CA) is set.
pub fn write(args: &CertsArgs) -> Result<Report, String> {
    let out = &args.out;
    let mut report = Report::default();
    fs::create_dir_all(out).map_err(|err| format!("cannot create {}: {err}", out.display()))?;
    let (ca_crt, ca_key) = (out.join("ca.crt"), out.join("ca.key"));
    let ca = if ca_key.exists() && !args.new_ca {
        let cert = read(&ca_crt)?;
        let key = read(&ca_key)?;
        let ca = Ca::from_pem(&cert, &key).map_err(|err| {
            format!(
                "{} and {} do not form a usable CA ({err}); pass --new-ca to replace them",
                ca_crt.display(),
                ca_key.display()
            )
        })?;
        report.lines.push(format!(
            "kept     {} (pass --new-ca to replace)",
            ca_key.display()
        ));
        ca
    } else {
        let ca = Ca::new("Petra & Klaus private CA").map_err(|err| err.to_string())?;
        let pem = ca.pem();
        write_file(&ca_crt, &pem.cert, 0o644)?;
        write_file(&ca_key, &pem.key, 0o600)?;
        report.lines.push(format!(
            "wrote    {} and {}",
            ca_crt.display(),
            ca_key.display()
        ));
        ca
    };
    let ca_pem = ca.pem().cert;
    let leaves = [
        (
            "petra",
            petra_names(&args.namespace, &args.sans),
            Usage::Server,
        ),
        ("klaus", vec!["klaus".to_owned()], Usage::Client),
    ];
    for (name, names, usage) in leaves {
        let dir = out.join(name);
        let key_path = dir.join("tls.key");
        if key_path.exists() && !args.force && !args.new_ca {
            report.lines.push(format!(
                "kept     {} (pass --force to replace)",
                dir.display()
            ));
            continue;
        }
        fs::create_dir_all(&dir)
            .map_err(|err| format!("cannot create {}: {err}", dir.display()))?;
        let leaf = ca
            .issue_for_days(&names, usage, args.days)
            .map_err(|err| err.to_string())?;
        // The key first: a reader that sees the new certificate also finds its key.
        write_file(&key_path, &leaf.key, 0o600)?;
        write_file(&dir.join("tls.crt"), &leaf.cert, 0o644)?;
        write_file(&dir.join("ca.crt"), &ca_pem, 0o644)?;
        report
            .lines
            .push(format!("wrote    {} ({})", dir.display(), names.join(", ")));
    }
    Ok(report)
}

fn read(path: &Path) -> Result<String, String> {
    fs::read_to_string(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// Writes a file atomically (a temporary file renamed over it) with the given mode.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let result = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut file| {
            file.write_all(contents.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    result.map_err(|err| format!("cannot write {}: {err}", path.display()))
}
