//! The certificate tool: a private CA, Petra's server certificate and Klaus's client
//! certificate, written in the layout of a `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`,
//! `ca.crt`) so that the same folder serves docker compose and a kustomize secretGenerator.
//!
//! ```text
//! OUT/ca.crt  OUT/ca.key
//! OUT/petra/{tls.crt,tls.key,ca.crt}   server certificate: petra, petra.NS.svc, ... + --san
//! OUT/klaus/{tls.crt,tls.key,ca.crt}   client certificate for mutual TLS: klaus + KLAUS_ID
//! ```
//!
//! Every file is written through a temporary file of its own (created exclusively, never through
//! a symlink, with its final mode from the start), synced, renamed over the old one, and the
//! folder synced, so that a crash or a planted file never leaves a key readable or half written.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
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
        // Path length 0: this CA issues leaf certificates only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
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

    /// Issues a leaf certificate for `names` (DNS names, IP addresses, or URIs such as a
    /// SPIFFE ID, told apart by their `://`; the first name is also the common name), valid from
    /// `not_before` to `not_after`.
    pub fn issue(
        &self,
        names: &[String],
        usage: Usage,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Pem, rcgen::Error> {
        let key = KeyPair::generate()?;
        let (uris, hosts): (Vec<&String>, Vec<&String>) =
            names.iter().partition(|name| name.contains("://"));
        let mut params = CertificateParams::new(hosts.into_iter().cloned().collect::<Vec<_>>())?;
        for uri in uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(DnType::CommonName, first.as_str());
        }
        params.is_ca = IsCa::NoCa;
        // The keys are ECDSA, which signs and never encrypts: RFC 5480 allows no
        // keyEncipherment for it.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
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

/// The SPIFFE-style identity Klaus's client certificate carries as a URI SAN, the form Linkerd
/// and Istio use: `spiffe://petra-klaus/ns/NAMESPACE/sa/klaus`. Petra's
/// TLS_CLIENT_ALLOWED_NAMES lists it.
pub fn klaus_id(namespace: &str) -> String {
    format!("spiffe://petra-klaus/ns/{namespace}/sa/klaus")
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
        (
            "klaus",
            vec!["klaus".to_owned(), klaus_id(&args.namespace)],
            Usage::Client,
        ),
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

/// Writes a file atomically with the given mode: a temporary file of its own in the same folder,
/// created exclusively (`O_EXCL`, so neither a leftover file nor a symlink planted under its name
/// is ever opened), synced, renamed over `path`, and then the folder synced so that the rename
/// itself survives a crash.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), String> {
    let fail = |err: std::io::Error| format!("cannot write {}: {err}", path.display());
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let (tmp, mut file) = create_temporary(dir, path, mode).map_err(fail)?;
    let written = file
        .write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(err) = written {
        // Best effort: the temporary file holds nothing the old file did not.
        let _ = fs::remove_file(&tmp);
        return Err(fail(err));
    }
    fs::File::open(dir)
        .and_then(|dir| dir.sync_all())
        .map_err(|err| format!("cannot sync {}: {err}", dir.display()))
}

/// Creates a new, empty temporary file next to `path`, named `.NAME.RANDOM.tmp`, with `mode`.
fn create_temporary(dir: &Path, path: &Path, mode: u32) -> std::io::Result<(PathBuf, fs::File)> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |name| name.to_string_lossy());
    let mut attempts = 0;
    loop {
        let tmp = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let opened = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp);
        match opened {
            Ok(file) => {
                // The umask may have taken bits away; set exactly `mode`, on the open file.
                file.set_permissions(fs::Permissions::from_mode(mode))?;
                return Ok((tmp, file));
            }
            // A name taken by chance (or by someone guessing): draw another.
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists && attempts < 16 => {
                attempts += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::pem::parse_x509_pem;

    use super::*;

    fn args(out: &Path) -> CertsArgs {
        CertsArgs {
            out: out.to_owned(),
            namespace: "petra-klaus".to_owned(),
            sans: Vec::new(),
            days: 1,
            force: false,
            new_ca: false,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).expect("metadata").permissions().mode() & 0o777
    }

    /// Calls `check` with the parsed certificate in the PEM file at `path`.
    fn with_cert(path: &Path, check: impl FnOnce(&x509_parser::certificate::X509Certificate<'_>)) {
        let pem = fs::read(path).expect("read certificate");
        let (_, pem) = parse_x509_pem(&pem).expect("PEM");
        let cert = pem.parse_x509().expect("X.509");
        check(&cert);
    }

    #[test]
    fn leftover_or_planted_temporary_files_never_shape_the_new_key() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let out = dir.path().join("certs");
        let petra = out.join("petra");
        fs::create_dir_all(&petra).expect("create");
        // A world-readable leftover under the name the tool once used for its temporary file,
        // and a symlink under the same name in Klaus's folder pointing at a file outside.
        let leftover = petra.join("tls.tmp");
        fs::write(&leftover, "old").expect("write leftover");
        fs::set_permissions(&leftover, fs::Permissions::from_mode(0o666)).expect("chmod");
        let klaus = out.join("klaus");
        fs::create_dir_all(&klaus).expect("create");
        let outside = dir.path().join("outside");
        fs::write(&outside, "").expect("write target");
        symlink(&outside, klaus.join("tls.tmp")).expect("symlink");

        write(&args(&out)).expect("certificates written");

        for key in [
            out.join("ca.key"),
            petra.join("tls.key"),
            klaus.join("tls.key"),
        ] {
            assert_eq!(mode(&key), 0o600, "{}", key.display());
            let text = fs::read_to_string(&key).expect("read key");
            assert!(text.contains("PRIVATE KEY"), "{}", key.display());
        }
        assert_eq!(mode(&petra.join("tls.crt")), 0o644);
        assert_eq!(
            fs::read_to_string(&outside).expect("read target"),
            "",
            "a key was written through the symlink"
        );
        // Nothing of the tool's own is left behind.
        for folder in [&out, &petra, &klaus] {
            for entry in fs::read_dir(folder).expect("list") {
                let name = entry.expect("entry").file_name();
                let name = name.to_string_lossy();
                assert!(
                    !name.starts_with('.'),
                    "temporary file {name} left in {}",
                    folder.display()
                );
            }
        }
    }

    #[test]
    fn a_temporary_name_already_taken_is_never_opened() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let target = dir.path().join("tls.key");
        let (tmp, _file) = create_temporary(dir.path(), &target, 0o600).expect("created");
        // Creating it again must fail rather than open what is there.
        let again = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp);
        assert!(again.is_err());
        assert_eq!(mode(&tmp), 0o600);
    }

    #[test]
    fn leaves_sign_only_and_the_ca_issues_no_other_ca() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let out = dir.path().join("certs");
        write(&args(&out)).expect("certificates written");
        with_cert(&out.join("ca.crt"), |ca| {
            let constraints = ca
                .basic_constraints()
                .expect("one extension")
                .expect("basic constraints")
                .value;
            assert!(constraints.ca);
            assert_eq!(constraints.path_len_constraint, Some(0));
        });
        for leaf in ["petra", "klaus"] {
            with_cert(&out.join(leaf).join("tls.crt"), |cert| {
                let usage = cert
                    .key_usage()
                    .expect("one extension")
                    .expect("key usage")
                    .value;
                assert!(usage.digital_signature(), "{leaf}");
                assert!(!usage.key_encipherment(), "{leaf} has keyEncipherment");
                assert!(!usage.key_cert_sign(), "{leaf}");
            });
        }
    }

    #[test]
    fn klaus_carries_its_spiffe_id_as_a_uri() {
        let dir = tempfile::tempdir().expect("temporary folder");
        let out = dir.path().join("certs");
        let mut args = args(&out);
        args.namespace = "shop".to_owned();
        write(&args).expect("certificates written");
        with_cert(&out.join("klaus").join("tls.crt"), |cert| {
            let names: Vec<String> = cert
                .extensions()
                .iter()
                .filter_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectAlternativeName(san) => Some(san),
                    _ => None,
                })
                .flat_map(|san| san.general_names.iter())
                .map(|name| match name {
                    GeneralName::URI(uri) => format!("uri:{uri}"),
                    GeneralName::DNSName(dns) => format!("dns:{dns}"),
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(
                names,
                ["dns:klaus", "uri:spiffe://petra-klaus/ns/shop/sa/klaus"]
            );
        });
    }
}
