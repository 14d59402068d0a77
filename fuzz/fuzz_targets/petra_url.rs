//! `PETRA_URL`: any text gives URLs Klaus can append paths to, in priority order, or a
//! `ConfigError` naming PETRA_URL, never a panic. An accepted URL is https, has a host, carries
//! no credentials, query or fragment, and its path ends in '/'.
#![no_main]

use klaus::upstream::config::{MAX_URLS, Target, parse_urls};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|raw: &str| {
    match parse_urls(raw) {
        Ok(targets) => {
            assert!(!targets.is_empty() && targets.len() <= MAX_URLS, "{raw:?}");
            for (priority, target) in targets.iter().enumerate() {
                assert_eq!(target.priority, priority);
                assert!(!target.host.is_empty(), "{raw:?}");
                check(raw, target);
            }
        }
        Err(err) => {
            assert_eq!(err.var, "PETRA_URL");
            assert!(!err.problem.is_empty());
        }
    }
});

fn check(raw: &str, target: &Target) {
    let url = &target.url;
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
    let joined = url.join("").expect("an accepted base URL joins");
    assert_eq!(joined.scheme(), "https");
    assert_eq!(joined.host_str(), url.host_str());
}
