//! Client certificates on the main listener: the allow-list of client identities, the
//! verifier that checks the chain and then the identity, and the count of refusals by reason.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName};

use crate::error::ConfigError;

/// The client identities a listener accepts (TLS_CLIENT_ALLOWED_NAMES): URIs, such as the
/// SPIFFE ID `spiffe://petra-klaus/ns/petra-klaus/sa/klaus`, are compared exactly with the
/// certificate's URI SANs; other names with its DNS SANs, ignoring ASCII case. The common name
/// is never looked at, as in every client of the Web PKI since RFC 6125.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedNames {
    uris: Vec<String>,
    dns: Vec<String>,
}

impl AllowedNames {
    /// The variable the list comes from.
    pub const VAR: &'static str = "TLS_CLIENT_ALLOWED_NAMES";

    /// Parses a comma-separated list; an empty list or a name that is neither a URI nor a DNS
    /// name is an error.
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let mut names = Self {
            uris: Vec::new(),
            dns: Vec::new(),
        };
        for name in raw
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
        {
            if name.contains("://") {
                if !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(ConfigError::new(
                        Self::VAR,
                        format!("{name:?} is not a URI (visible ASCII, no spaces)"),
                    ));
                }
                names.uris.push(name.to_owned());
            } else if rustls::pki_types::DnsName::try_from(name).is_ok() && !name.contains('*') {
                names.dns.push(name.to_ascii_lowercase());
            } else {
                return Err(ConfigError::new(
                    Self::VAR,
                    format!(
                        "{name:?} is neither a URI (such as spiffe://petra-klaus/ns/petra-klaus/sa/klaus) nor a DNS name (wildcards are not accepted)"
                    ),
                ));
            }
        }
        if names.uris.is_empty() && names.dns.is_empty() {
            return Err(ConfigError::new(
                Self::VAR,
                "is set but lists no name; list the client identities to accept (comma-separated), or unset it to accept every certificate from TLS_CLIENT_CA_FILE",
            ));
        }
        Ok(names)
    }

    /// Whether one of `presented` is allowed.
    fn allows(&self, presented: &[SubjectName]) -> bool {
        presented.iter().any(|name| match name {
            SubjectName::Uri(uri) => self.uris.iter().any(|allowed| allowed == uri),
            SubjectName::Dns(dns) => self
                .dns
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(dns)),
        })
    }
}

/// A name a certificate carries in its subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SubjectName {
    Uri(String),
    Dns(String),
}

impl std::fmt::Display for SubjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uri(uri) => write!(f, "URI:{uri}"),
            Self::Dns(dns) => write!(f, "DNS:{dns}"),
        }
    }
}

/// The URI and DNS names of a certificate's subject alternative names.
fn subject_names(cert: &CertificateDer<'_>) -> Result<Vec<SubjectName>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|err| err.to_string())?;
    let Some(san) = parsed
        .subject_alternative_name()
        .map_err(|err| err.to_string())?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some(SubjectName::Uri((*uri).to_owned())),
            GeneralName::DNSName(dns) => Some(SubjectName::Dns((*dns).to_owned())),
            _ => None,
        })
        .collect())
}

/// `tls_client_certificates_refused_total{reason}`: client certificates the main listener
/// refused, by reason.
#[derive(Debug, Clone, Default)]
pub(super) struct ClientRefusals {
    refused: Family<ReasonLabel, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

impl ClientRefusals {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let this = Self::default();
        registry.register(
            "tls_client_certificates_refused",
            "Client certificates refused in the TLS handshake, by reason: name_not_allowed (valid, but not in TLS_CLIENT_ALLOWED_NAMES), unknown_ca, expired, not_valid_yet, bad_signature, wrong_purpose, invalid",
            this.refused.clone(),
        );
        this
    }

    fn count(&self, reason: &'static str) {
        self.refused.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// The reason label for a refusal by the chain checks.
fn chain_reason(err: &rustls::Error) -> &'static str {
    match err {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_valid_yet"
            }
            CertificateError::BadSignature => "bad_signature",
            CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
                "wrong_purpose"
            }
            _ => "invalid",
        },
        _ => "invalid",
    }
}

/// Checks client certificates: the chain and dates by webpki against TLS_CLIENT_CA_FILE, then
/// the identity against TLS_CLIENT_ALLOWED_NAMES. An identity not on the list is refused with the
/// `access_denied` alert (rustls's alert for [`CertificateError::ApplicationVerificationFailure`]),
/// counted as `name_not_allowed` and logged with the names the certificate carries; those need a
/// certificate from the CA, so they cannot be used to flood the log. Chain failures, which any
/// peer can cause, are counted and logged at debug level only.
#[derive(Debug)]
pub(super) struct ClientVerifier {
    pub(super) chain: Arc<dyn ClientCertVerifier>,
    pub(super) allowed: Option<AllowedNames>,
    pub(super) refusals: ClientRefusals,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.chain.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.chain.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls::pki_types::UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|err| {
                let reason = chain_reason(err);
                self.refusals.count(reason);
                tracing::debug!(reason, error = %err, "client certificate refused");
            })?;
        let Some(allowed) = &self.allowed else {
            return Ok(verified);
        };
        let presented = match subject_names(end_entity) {
            Ok(names) => names,
            Err(err) => {
                self.refusals.count("invalid");
                tracing::warn!(reason = "invalid", error = %err, "client certificate refused: its names cannot be read");
                return Err(rustls::Error::InvalidCertificate(
                    CertificateError::BadEncoding,
                ));
            }
        };
        if allowed.allows(&presented) {
            return Ok(verified);
        }
        self.refusals.count("name_not_allowed");
        let presented = presented
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        tracing::warn!(
            reason = "name_not_allowed",
            presented = %presented,
            "client certificate refused: none of its names is in TLS_CLIENT_ALLOWED_NAMES"
        );
        Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.chain.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.chain.requires_raw_public_keys()
    }
}
