//! The nginx pair that Petra and Klaus are measured against: its two configurations
//! (`xtask/bench/nginx-*.conf`), filled in with ports and certificate paths when the stack starts.
//! The `@PREFIX@` of each, its working folder, is left to the caller.

use std::path::Path;

/// nginx as Petra: `hello` over TLS, client certificates required.
const PETRA_CONF: &str = include_str!("../../bench/nginx-petra.conf");

/// nginx as Klaus: HTTPS and plain-HTTP fronts proxying to nginx-Petra over mutual TLS.
const KLAUS_CONF: &str = include_str!("../../bench/nginx-klaus.conf");

/// nginx-Petra's configuration, listening on `port` with Petra's certificates from `certs`.
pub(super) fn petra_conf(port: u16, certs: &Path) -> String {
    let file = |p: &str| certs.join(p).display().to_string();
    PETRA_CONF
        .replace("@PORT@", &port.to_string())
        .replace("@CERT@", &file("petra/tls.crt"))
        .replace("@KEY@", &file("petra/tls.key"))
        .replace("@CLIENT_CA@", &file("petra/ca.crt"))
}

/// nginx-Klaus's configuration: its fronts on `https_port` and `http_port`, calling nginx-Petra on
/// `petra_port` with Klaus's client certificate from `certs`.
pub(super) fn klaus_conf(https_port: u16, http_port: u16, petra_port: u16, certs: &Path) -> String {
    let file = |p: &str| certs.join(p).display().to_string();
    KLAUS_CONF
        .replace("@HTTPS_PORT@", &https_port.to_string())
        .replace("@HTTP_PORT@", &http_port.to_string())
        .replace("@PETRA_PORT@", &petra_port.to_string())
        .replace("@CERT@", &file("petra/tls.crt"))
        .replace("@KEY@", &file("petra/tls.key"))
        .replace("@CLIENT_CERT@", &file("klaus/tls.crt"))
        .replace("@CLIENT_KEY@", &file("klaus/tls.key"))
        .replace("@CA@", &file("klaus/ca.crt"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_but_the_prefix_is_filled_in() {
        let certs = Path::new("/certs");
        for conf in [petra_conf(1, certs), klaus_conf(2, 3, 1, certs)] {
            let left: Vec<&str> = conf
                .split('@')
                .skip(1)
                .step_by(2)
                .filter(|name| *name != "PREFIX")
                .collect();
            assert_eq!(left, Vec::<&str>::new(), "{conf}");
            assert!(conf.contains("/certs/petra/tls.crt"));
        }
    }
}
