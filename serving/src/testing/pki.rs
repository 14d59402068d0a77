//! Test certificates: a private CA in a temporary folder, and the leaf certificates the tests
//! present and serve.

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::certs::{Ca, Pem, Usage};

/// A certificate and key written to files.
#[derive(Debug, Clone)]
pub struct Files {
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
}

/// A private CA in a temporary folder, with Petra's server certificate (for `localhost` and
/// `127.0.0.1`) and Klaus's client certificate ([`klaus_names`]) already issued.
#[derive(Debug)]
pub struct TestPki {
    /// The folder; removed on drop.
    pub dir: tempfile::TempDir,
    /// The CA, to issue more certificates.
    pub ca: Ca,
    /// The CA certificate file.
    pub ca_file: PathBuf,
    /// Petra's server certificate.
    pub petra: Files,
    /// Klaus's client certificate.
    pub klaus: Files,
}

impl TestPki {
    /// Makes a fresh CA and both identities.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary folder");
        let ca = Ca::new("test CA").expect("CA");
        let ca_file = dir.path().join("ca.crt");
        std::fs::write(&ca_file, ca.pem().cert).expect("write CA");
        let petra = write_pem(dir.path(), "petra", &server_cert(&ca));
        let klaus = write_pem(
            dir.path(),
            "klaus",
            &ca.issue_for_days(&klaus_names(), Usage::Client, 1)
                .expect("client cert"),
        );
        Self {
            dir,
            ca,
            ca_file,
            petra,
            klaus,
        }
    }

    /// Issues and writes another leaf certificate under `name`.
    pub fn issue(
        &self,
        name: &str,
        names: &[&str],
        usage: Usage,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Files {
        let names: Vec<String> = names.iter().map(|&n| n.to_owned()).collect();
        let pem = self
            .ca
            .issue(&names, usage, not_before, not_after)
            .expect("issue certificate");
        write_pem(self.dir.path(), name, &pem)
    }

    /// A path inside the folder, for files a test writes itself.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// The names of Klaus's client certificate, as `petra certs` issues it: `klaus` and its SPIFFE
/// ID in the `petra-klaus` namespace.
pub fn klaus_names() -> Vec<String> {
    vec!["klaus".to_owned(), crate::certs::klaus_id("petra-klaus")]
}

/// A server certificate for `localhost` and `127.0.0.1`, valid for a day.
pub fn server_cert(ca: &Ca) -> Pem {
    ca.issue_for_days(
        &["localhost".to_owned(), "127.0.0.1".to_owned()],
        Usage::Server,
        1,
    )
    .expect("server cert")
}

/// Writes a certificate and key as `NAME.crt` and `NAME.key` in `dir`.
pub fn write_pem(dir: &Path, name: &str, pem: &Pem) -> Files {
    let files = Files {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&files.cert, &pem.cert).expect("write certificate");
    std::fs::write(&files.key, &pem.key).expect("write key");
    files
}

/// A client certificate for `klaus` from a CA of its own, which no test server trusts, written
/// to `dir`.
pub fn foreign_client(dir: &Path) -> Files {
    let stranger = Ca::new("another CA").expect("CA");
    let pem = stranger
        .issue_for_days(&["klaus".to_owned()], Usage::Client, 1)
        .expect("cert");
    write_pem(dir, "foreign", &pem)
}
