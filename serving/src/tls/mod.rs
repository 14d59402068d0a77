//! TLS for the main listener: PEM files loaded and checked before binding, TLS 1.3 only unless
//! TLS_MIN_VERSION allows 1.2, HTTP/2 and HTTP/1.1 by ALPN, optional client-certificate
//! verification with an allow-list of client identities, and reloading of rotated files (as
//! cert-manager or a Secret update writes them) without a restart.
//!
//! One room per concern, and the paths other modules and crates use are re-exported here:
//!
//! - `provider`: the crypto provider and [`MinVersion`];
//! - `pem`: reading and parsing certificates, keys and roots, and [`Identity`];
//! - `client`: client identities ([`AllowedNames`]), the client-certificate verifier and its
//!   refusal counts;
//! - `reload`: files watched for rotation ([`WatchedFiles`], [`spawn_reloader`]);
//! - `listener`: the listener's configuration ([`ServerFiles`], [`server_config`],
//!   [`ReloadingConfig`]), assembled from all of the above.
//!
//! The rooms use each other in one direction only: `pem` uses `provider`, `reload` uses `pem`,
//! and `listener` uses every other; `provider` and `client` use none, and none uses `listener`.

mod client;
mod listener;
mod pem;
mod provider;
mod reload;

pub use client::AllowedNames;
pub use listener::{ReloadingConfig, ServerFiles, server_config};
pub use pem::{Identity, load_certs, load_roots, parse_certs, parse_key, roots_from};
pub use provider::{MinVersion, provider};
pub use reload::{FileSet, ReloadMetrics, WatchedFiles, spawn_reloader};
