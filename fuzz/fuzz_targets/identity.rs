//! A certificate chain and its key (`TLS_CERT_FILE` + `TLS_KEY_FILE`, or Klaus's client identity):
//! any pair gives an identity or a `ConfigError` naming one of the two variables, never a panic.
//!
//! Input: the certificate PEM, a NUL byte, the key PEM (without a NUL, the key is empty).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serving::tls::Identity;

const CERT_VAR: &str = "PETRA_CLIENT_CERT_FILE";
const KEY_VAR: &str = "PETRA_CLIENT_KEY_FILE";

fuzz_target!(|data: &[u8]| {
    let (cert_pem, key_pem) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let parsed = Identity::parse(
        CERT_VAR,
        Path::new("/certs/klaus/tls.crt"),
        cert_pem,
        KEY_VAR,
        Path::new("/certs/klaus/tls.key"),
        key_pem,
    );
    match parsed {
        Ok(identity) => assert!(!identity.chain.is_empty()),
        Err(err) => {
            assert!(err.var == CERT_VAR || err.var == KEY_VAR, "{err}");
            assert!(!err.problem.is_empty());
        }
    }
});
