//! PEM files read and parsed into certificates, keys and root stores, each error naming the
//! variable that set the file; and [`Identity`], a chain checked against its key.

use std::path::Path;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::provider::provider;
use crate::error::ConfigError;

/// Reads a file, naming the variable it came from when it cannot be read.
pub(super) fn read(var: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path)
        .map_err(|err| ConfigError::new(var, format!("cannot read {}: {err}", path.display())))
}

/// Parses every certificate in a PEM file; an empty or malformed file is an error.
pub fn load_certs(
    var: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    parse_certs(var, path, &read(var, path)?)
}

/// Parses every certificate in PEM text read from `path`; an empty or malformed text is an
/// error naming `var`.
pub fn parse_certs(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| {
            ConfigError::new(var, format!("{} is not valid PEM: {err}", path.display()))
        })?;
    if certs.is_empty() {
        return Err(ConfigError::new(
            var,
            format!(
                "{} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// Parses the first private key in PEM text read from `path`: PKCS#8, PKCS#1 or SEC1.
pub fn parse_key(
    var: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, ConfigError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| {
        let what = match err {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "holds no PEM private key (expected PKCS#8, PKCS#1 or SEC1)".to_owned()
            }
            other => format!("is not a valid PEM private key: {other}"),
        };
        ConfigError::new(var, format!("{} {what}", path.display()))
    })
}

/// Loads CA certificates into a root store.
pub fn load_roots(var: &'static str, path: &Path) -> Result<RootCertStore, ConfigError> {
    roots_from(var, path, load_certs(var, path)?)
}

/// Puts `certs`, read from `path`, into a root store; one that is not a usable CA is an error
/// naming `var`.
pub fn roots_from(
    var: &'static str,
    path: &Path,
    certs: Vec<CertificateDer<'static>>,
) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|err| {
            ConfigError::new(
                var,
                format!(
                    "{} holds a certificate that is not a usable CA: {err}",
                    path.display()
                ),
            )
        })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, checked to belong together.
#[derive(Debug)]
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key of the leaf.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Loads a chain and key, naming `cert_var` or `key_var` in any error, and checks that the
    /// key is the one the leaf certificate was issued for.
    pub fn load(
        cert_var: &'static str,
        cert: &Path,
        key_var: &'static str,
        key: &Path,
    ) -> Result<Self, ConfigError> {
        let cert_pem = read(cert_var, cert)?;
        let key_pem = read(key_var, key)?;
        Self::parse(cert_var, cert, &cert_pem, key_var, key, &key_pem)
    }

    /// [`Identity::load`] for PEM text already read.
    pub fn parse(
        cert_var: &'static str,
        cert: &Path,
        cert_pem: &[u8],
        key_var: &'static str,
        key: &Path,
        key_pem: &[u8],
    ) -> Result<Self, ConfigError> {
        let chain = parse_certs(cert_var, cert, cert_pem)?;
        let private = parse_key(key_var, key, key_pem)?;
        let signing = provider()
            .key_provider
            .load_private_key(private.clone_key())
            .map_err(|err| {
                ConfigError::new(
                    key_var,
                    format!("{} is not a usable private key: {err}", key.display()),
                )
            })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing)
            .keys_match()
            .map_err(|_| {
                ConfigError::new(
                    key_var,
                    format!(
                        "the key in {} does not match the certificate in {} ({cert_var})",
                        key.display(),
                        cert.display()
                    ),
                )
            })?;
        Ok(Self {
            chain,
            key: private,
        })
    }
}
