//! `TLS_CERT_FILE`, `TLS_CLIENT_CA_FILE`, `PETRA_CA_FILE`: any bytes give certificates or a
//! `ConfigError` that names the variable, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use serving::tls::parse_certs;

const VAR: &str = "TLS_CERT_FILE";

fuzz_target!(|pem: &[u8]| {
    match parse_certs(VAR, Path::new("/certs/tls.crt"), pem) {
        Ok(certs) => assert!(!certs.is_empty(), "Ok with no certificate"),
        Err(err) => {
            assert_eq!(err.var, VAR);
            assert!(!err.problem.is_empty());
        }
    }
});
