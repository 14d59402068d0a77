//! `PETRA_URL`: any text gives a URL Klaus can append paths to, or a `ConfigError` naming
//! PETRA_URL, never a panic. An accepted URL is https, has a host, carries no credentials, query
//! or fragment, and its path ends in '/'.
#![no_main]

use klaus::petra::parse_url;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    match parse_url(raw) {
        Ok(url) => {
            assert_eq!(url.scheme(), "https", "{raw:?} -> {url}");
            assert!(
                url.host_str().is_some_and(|h| !h.is_empty()),
                "{raw:?} -> {url}"
            );
            assert!(url.path().ends_with('/'), "{raw:?} -> {url}");
            assert!(
                url.username().is_empty() && url.password().is_none(),
                "{raw:?} -> {url}"
            );
            assert!(
                url.query().is_none() && url.fragment().is_none(),
                "{raw:?} -> {url}"
            );
            // What Klaus calls: the base URL joined with "", i.e. the base itself.
            let target = url.join("").expect("an accepted base URL joins");
            assert_eq!(target.scheme(), "https");
            assert_eq!(target.host_str(), url.host_str());
        }
        Err(err) => {
            assert_eq!(err.var, "PETRA_URL");
            assert!(!err.problem.is_empty());
        }
    }
});
