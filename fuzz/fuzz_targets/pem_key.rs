//! `TLS_KEY_FILE`, `PETRA_CLIENT_KEY_FILE`: any bytes give a key or a `ConfigError` that names the
//! key's variable, never a panic.
//!
//! `serving::tls::parse_key` is private, so the key goes through `Identity::parse` next to a fixed,
//! valid certificate (public; its key was thrown away): that reaches `parse_key` with every input,
//! and then the provider's key loading and the key/certificate match.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serving::tls::Identity;

const CERT_VAR: &str = "TLS_CERT_FILE";
const KEY_VAR: &str = "TLS_KEY_FILE";
const CERT: &[u8] = include_bytes!("../fixtures/leaf.crt");

fuzz_target!(|key_pem: &[u8]| {
    let parsed = Identity::parse(
        CERT_VAR,
        Path::new("/certs/tls.crt"),
        CERT,
        KEY_VAR,
        Path::new("/certs/tls.key"),
        key_pem,
    );
    match parsed {
        Ok(identity) => assert!(!identity.chain.is_empty()),
        Err(err) => {
            // The certificate is valid, so every error is about the key.
            assert_eq!(err.var, KEY_VAR, "{err}");
            assert!(!err.problem.is_empty());
        }
    }
});
