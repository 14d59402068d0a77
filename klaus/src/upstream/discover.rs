//! Discovery: each URL's host is resolved again periodically, and at once when an attempt
//! fails; every address becomes an endpoint, kept (with its connections and outlier state)
//! for as long as the answers name it.

use std::fmt::Debug;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

/// What a host name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// These addresses (at least one).
    Addresses(Vec<IpAddr>),
    /// The name has no address (NXDOMAIN, or no record): a headless Service without ready
    /// pods, a name that is wrong. Its endpoints are dropped.
    NotFound,
    /// Resolving failed for another reason (a DNS server that did not answer): the endpoints
    /// known are kept, as every resolver-driven balancer does.
    Failed(String),
}

/// Resolves host names: the system's resolver in Klaus, a table in tests.
pub trait Resolve: Debug + Send + Sync + 'static {
    /// Resolves `host`, a name or an address written out.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = Resolution> + Send + 'a>>;
}

/// The system's resolver (`getaddrinfo`: /etc/hosts, the cluster's DNS and its search
/// domains), as every other program on the machine resolves.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

/// How long one resolution may take before it counts as failed.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = Resolution> + Send + 'a>> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Resolution::Addresses(vec![ip]);
            }
            match tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, 0))).await {
                Err(_) => Resolution::Failed(format!("no answer within {RESOLVE_TIMEOUT:?}")),
                Ok(Ok(addrs)) => addresses(addrs.map(|addr| addr.ip()).collect()),
                Ok(Err(err)) if is_not_found(&err) => Resolution::NotFound,
                Ok(Err(err)) => Resolution::Failed(err.to_string()),
            }
        })
    }
}

/// `ips`, sorted and without repeats; none is [`Resolution::NotFound`].
pub(crate) fn addresses(mut ips: Vec<IpAddr>) -> Resolution {
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        Resolution::NotFound
    } else {
        Resolution::Addresses(ips)
    }
}

/// Whether `getaddrinfo` said the name has no address (`EAI_NONAME`, `EAI_NODATA`) rather than
/// that it could not find out (`EAI_AGAIN`, `EAI_FAIL`). The standard library keeps only
/// glibc's and musl's text for the code, so the text is what can be read.
fn is_not_found(err: &std::io::Error) -> bool {
    let text = err.to_string();
    [
        "not known",
        "No address associated",
        "no address",
        "Name does not resolve",
    ]
    .iter()
    .any(|says| text.contains(says))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_and_names_that_do_not_exist() {
        let resolver = SystemResolver;
        assert_eq!(
            resolver.resolve("127.0.0.9").await,
            Resolution::Addresses(vec!["127.0.0.9".parse().expect("ip")])
        );
        assert_eq!(
            resolver.resolve("::1").await,
            Resolution::Addresses(vec!["::1".parse().expect("ip")])
        );
        assert!(matches!(
            resolver.resolve("localhost").await,
            Resolution::Addresses(ips) if !ips.is_empty()
        ));
        // RFC 6761: `.invalid` never resolves.
        assert_eq!(
            resolver.resolve("petra.invalid").await,
            Resolution::NotFound
        );
    }

    #[test]
    fn answers_are_sorted_without_repeats() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            addresses(vec![ip("10.0.0.2"), ip("10.0.0.1"), ip("10.0.0.2")]),
            Resolution::Addresses(vec![ip("10.0.0.1"), ip("10.0.0.2")])
        );
        assert_eq!(addresses(Vec::new()), Resolution::NotFound);
    }
}
