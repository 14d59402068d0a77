//! The crypto provider and the TLS versions that both services' listeners and Klaus's client
//! build their configurations with.

use std::sync::Arc;

/// The crypto provider both services use: ring, so that the build needs no C toolchain beyond
/// what ring itself compiles, and never OpenSSL.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The oldest TLS version a listener (TLS_MIN_VERSION) or Klaus's client
/// (PETRA_TLS_MIN_VERSION) accepts. TLS 1.3 by default: under TLS 1.2 the client certificate,
/// and with it the client's identity, crosses the network in clear.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3, for an old peer that cannot speak 1.3.
    #[value(name = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[default]
    #[value(name = "1.3")]
    Tls13,
}

impl MinVersion {
    /// The protocol versions offered, newest first; never older than TLS 1.2.
    pub fn versions(self) -> &'static [&'static rustls::SupportedProtocolVersion] {
        const TLS12_AND_13: &[&rustls::SupportedProtocolVersion] =
            &[&rustls::version::TLS13, &rustls::version::TLS12];
        const TLS13_ONLY: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];
        match self {
            Self::Tls12 => TLS12_AND_13,
            Self::Tls13 => TLS13_ONLY,
        }
    }
}
