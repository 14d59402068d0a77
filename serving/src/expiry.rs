//! When the certificates in use expire, as gauges an alert can watch before the first handshake
//! fails: `tls_certificate_not_after_timestamp_seconds{role,subject}` for a listener (its
//! certificate, `server`, and each CA it takes client certificates from, `client_ca`), and Klaus's
//! `petra_tls_certificate_not_after_timestamp_seconds` (its client certificate, `client`, and each
//! CA in PETRA_CA_FILE, `petra_ca`). Replaced on every successful (re)load, so a rotated
//! certificate's old date disappears with it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    role: &'static str,
    subject: String,
}

/// The expiry dates of the certificates one TLS configuration uses.
#[derive(Debug, Clone, Default)]
pub struct CertificateExpiry {
    dates: Family<Labels, Gauge<f64, AtomicU64>>,
    /// The series shown now, to remove when a reload replaces them.
    shown: Arc<Mutex<Vec<Labels>>>,
}

impl CertificateExpiry {
    /// Registers the gauges as `name` (e.g. `tls_certificate_not_after_timestamp_seconds`).
    pub fn register(registry: &mut Registry, name: &str) -> Self {
        let this = Self::default();
        registry.register(
            name,
            "When each certificate in use expires (notAfter), in seconds since the Unix epoch, by role and subject",
            this.dates.clone(),
        );
        this
    }

    /// Shows the dates of `certs`, each with its role, in place of those shown before.
    /// Certificates that cannot be parsed are left out (loading them has failed already).
    pub fn show<'a>(
        &self,
        certs: impl IntoIterator<Item = (&'static str, &'a CertificateDer<'a>)>,
    ) {
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        for labels in shown.drain(..) {
            self.dates.remove(&labels);
        }
        for (role, cert) in certs {
            if let Some((subject, not_after)) = not_after(cert) {
                let labels = Labels { role, subject };
                self.dates.get_or_create(&labels).set(not_after);
                shown.push(labels);
            }
        }
    }
}

/// A certificate's subject and notAfter (seconds since the epoch).
fn not_after(cert: &CertificateDer<'_>) -> Option<(String, f64)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let subject = parsed.subject().to_string();
    Some((subject, parsed.validity().not_after.timestamp() as f64))
}

#[cfg(all(test, feature = "certs"))]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    #[test]
    fn a_reload_replaces_the_dates_shown() {
        let ca = crate::certs::Ca::new("test CA").expect("CA");
        let leaf = ca
            .issue_for_days(&["petra".to_owned()], crate::certs::Usage::Server, 90)
            .expect("leaf");
        let der = |pem: &str| {
            use rustls::pki_types::pem::PemObject;
            CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
        };
        let (petra, ca) = (der(&leaf.cert), der(&ca.pem().cert));
        let mut registry = Registry::default();
        let expiry = CertificateExpiry::register(
            &mut registry,
            "tls_certificate_not_after_timestamp_seconds",
        );
        expiry.show([("server", &petra), ("client_ca", &ca)]);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("tls_certificate_not_after_timestamp_seconds{"))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines.iter().any(|l| l.contains("role=\"server\"")),
            "{text}"
        );
        assert!(
            lines.iter().any(|l| l.contains("role=\"client_ca\"")),
            "{text}"
        );
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        for line in &lines {
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .expect("value");
            assert!(
                value > now + 80.0 * 86_400.0 && value < now + 3700.0 * 86_400.0,
                "{line}"
            );
        }
        expiry.show([("server", &petra)]);
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(
            !text.contains("client_ca"),
            "the CA's date stays after it is gone: {text}"
        );
    }
}
