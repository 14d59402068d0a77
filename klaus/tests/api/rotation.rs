//! Credentials that rotate while Klaus and Petra run: the three-step CA replacement of
//! docs/KUBERNETES.md with zero failed calls, and a half-written rotation kept out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serving::certs::{Ca, Usage};
use serving::testing::{Running, TestPki, loopback, server_cert, spawn, wait_until};

use crate::helpers::{get, petra_args, serve_args};
use crate::upstream::{Load, failed, value};

/// The expiry gauges of Petra's listener and of Klaus's client side.
const PETRA_EXPIRY: &str = "tls_certificate_not_after_timestamp_seconds";
const KLAUS_EXPIRY: &str = "petra_tls_certificate_not_after_timestamp_seconds";

/// The certificates of `role` in the `metric` series of a scrape: subject and days left.
fn expiring(text: &str, metric: &str, role: &str) -> Vec<(String, f64)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    let prefix = format!("{metric}{{role=\"{role}\",subject=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (subject, value) = rest.rsplit_once("\"} ")?;
            let not_after: f64 = value.parse().ok()?;
            Some((subject.to_owned(), (not_after - now) / 86_400.0))
        })
        .collect()
}

/// Writes `contents` to `path` as a Secret volume update does: whole, by a rename.
fn put(path: &Path, contents: &str) {
    let fresh = path.with_extension("new");
    std::fs::write(&fresh, contents).expect("write");
    std::fs::rename(&fresh, path).expect("rename");
}

/// Both services' TLS files, each in a file of its own as they are mounted in a cluster.
struct Mounted {
    petra_cert: PathBuf,
    petra_key: PathBuf,
    petra_client_ca: PathBuf,
    klaus_cert: PathBuf,
    klaus_key: PathBuf,
    klaus_petra_ca: PathBuf,
}

impl Mounted {
    fn new(dir: &Path) -> Self {
        let path = |name: &str| dir.join(name);
        Self {
            petra_cert: path("petra-tls.crt"),
            petra_key: path("petra-tls.key"),
            petra_client_ca: path("petra-ca.crt"),
            klaus_cert: path("klaus-tls.crt"),
            klaus_key: path("klaus-tls.key"),
            klaus_petra_ca: path("klaus-ca.crt"),
        }
    }

    fn trust(&self, cas: &[&Ca]) {
        let bundle: String = cas.iter().map(|ca| ca.pem().cert).collect();
        put(&self.petra_client_ca, &bundle);
        put(&self.klaus_petra_ca, &bundle);
    }

    fn certificates_from(&self, ca: &Ca) {
        let petra = server_cert(ca);
        put(&self.petra_cert, &petra.cert);
        put(&self.petra_key, &petra.key);
        let klaus = ca
            .issue_for_days(&["klaus".to_owned()], Usage::Client, 1)
            .expect("client certificate");
        put(&self.klaus_cert, &klaus.cert);
        put(&self.klaus_key, &klaus.key);
    }
}

/// Both sides' reload counters and Petra's accepted connections.
struct Seen {
    petra_reloads: f64,
    klaus_reloads: f64,
    accepted: f64,
}

async fn seen(petra: &Running, klaus: &Running) -> Seen {
    let (petra_text, klaus_text) = (petra.metrics().await, klaus.metrics().await);
    Seen {
        petra_reloads: value(&petra_text, r#"tls_reloads_total{result="ok"}"#),
        klaus_reloads: value(&klaus_text, r#"petra_tls_reloads_total{result="ok"}"#),
        accepted: value(&petra_text, "connections_accepted_total"),
    }
}

/// Waits until both sides have loaded one more set of files than `before` and Petra has
/// accepted a connection since: the step is in use on new connections, as an operator waits
/// for the pods to pick it up.
async fn picked_up(what: &str, petra: &Running, klaus: &Running, before: &Seen) {
    wait_until(what, Duration::from_secs(10), || async {
        let now = seen(petra, klaus).await;
        now.petra_reloads > before.petra_reloads && now.klaus_reloads > before.klaus_reloads
    })
    .await;
    let loaded = seen(petra, klaus).await;
    wait_until(
        &format!("{what}: a new connection"),
        Duration::from_secs(10),
        || async { seen(petra, klaus).await.accepted > loaded.accepted },
    )
    .await;
}

#[tokio::test]
async fn the_three_step_ca_replacement_fails_no_call() {
    let pki = TestPki::new();
    let old = &pki.ca;
    let files = Mounted::new(pki.dir.path());
    files.trust(&[old]);
    files.certificates_from(old);

    // Re-read every second; Petra closes connections after about a second, so that each
    // step is soon in use on new connections (both default to far longer).
    let mut petra_serve = serve_args();
    petra_serve.tls_cert_file = Some(files.petra_cert.clone());
    petra_serve.tls_key_file = Some(files.petra_key.clone());
    petra_serve.tls_client_ca_file = Some(files.petra_client_ca.clone());
    petra_serve.tls_reload_interval_seconds = 1;
    petra_serve.max_connection_age_seconds = 1;
    let petra = spawn(petra::service(loopback(), &petra_serve).expect("Petra")).await;
    let mut klaus_serve = serve_args();
    klaus_serve.tls_reload_interval_seconds = 1;
    let mut args = petra_args(&petra.https_url(), Some(files.klaus_petra_ca.clone()), None);
    args.petra_client_cert_file = Some(files.klaus_cert.clone());
    args.petra_client_key_file = Some(files.klaus_key.clone());
    let klaus = spawn(klaus::service(loopback(), &klaus_serve, &args).expect("Klaus")).await;
    assert_eq!(get(&klaus.http_url()).await.2, "hello world");

    let load = Load::start(klaus.http_url(), 4);
    let new = Ca::new("new test CA").expect("CA");

    // 1. Both sides trust both CAs.
    let before = seen(&petra, &klaus).await;
    files.trust(&[old, &new]);
    picked_up("both trust both CAs", &petra, &klaus, &before).await;
    // Each CA's expiry date is exported on both sides from the reload that brought it.
    assert_eq!(
        expiring(&petra.metrics().await, PETRA_EXPIRY, "client_ca").len(),
        2
    );
    assert_eq!(
        expiring(&klaus.metrics().await, KLAUS_EXPIRY, "petra_ca").len(),
        2
    );
    // 2. Certificates from the new CA.
    let before = seen(&petra, &klaus).await;
    files.certificates_from(&new);
    picked_up("certificates from the new CA", &petra, &klaus, &before).await;
    // 3. The old CA is no longer trusted.
    let before = seen(&petra, &klaus).await;
    files.trust(&[&new]);
    picked_up("only the new CA trusted", &petra, &klaus, &before).await;

    let statuses = load.finish().await;
    eprintln!(
        "figure: CA replaced in three steps under load: {} calls, {} failed",
        statuses.len(),
        failed(&statuses)
    );
    assert!(statuses.len() > 100, "too few calls: {}", statuses.len());
    assert_eq!(
        failed(&statuses),
        0,
        "{} of {} calls failed",
        failed(&statuses),
        statuses.len()
    );
    // Petra now refuses the old client certificate and Klaus still gets through on new
    // connections: Klaus presents its new certificate and trusts Petra's new one.
    let old_klaus = pki.klaus.clone();
    let refused = serving::testing::client(&files.klaus_petra_ca, Some(&old_klaus))
        .get(petra.https_url())
        .send()
        .await;
    assert!(refused.is_err(), "the old client certificate still works");
    // The old CA's date went with it, on both sides; each service's own certificate is the new
    // CA's, valid for a day.
    for (text, metric, ca_role, own_role) in [
        (petra.metrics().await, PETRA_EXPIRY, "client_ca", "server"),
        (klaus.metrics().await, KLAUS_EXPIRY, "petra_ca", "client"),
    ] {
        let cas = expiring(&text, metric, ca_role);
        assert!(
            matches!(cas.as_slice(), [(subject, days)] if subject.contains("new test CA") && *days > 3000.0),
            "{metric} {ca_role}: {cas:?}"
        );
        let own = expiring(&text, metric, own_role);
        assert!(
            matches!(own.as_slice(), [(_, days)] if (0.9..1.1).contains(days)),
            "{metric} {own_role}: {own:?}"
        );
    }
    let accepted = seen(&petra, &klaus).await.accepted;
    wait_until(
        "Klaus on yet another new connection",
        Duration::from_secs(10),
        || async {
            assert_eq!(get(&klaus.http_url()).await.2, "hello world");
            seen(&petra, &klaus).await.accepted > accepted
        },
    )
    .await;
    klaus.stop().await;
    petra.stop().await;
}

#[tokio::test]
async fn a_half_written_client_certificate_is_refused_counted_and_the_loaded_one_kept() {
    let pki = TestPki::new();
    let mut petra_serve = serve_args();
    petra_serve.tls_cert_file = Some(pki.petra.cert.clone());
    petra_serve.tls_key_file = Some(pki.petra.key.clone());
    petra_serve.tls_client_ca_file = Some(pki.ca_file.clone());
    petra_serve.max_connection_age_seconds = 1;
    let petra = spawn(petra::service(loopback(), &petra_serve).expect("Petra")).await;
    // Klaus's own copies, which the test breaks.
    let cert = pki.path("klaus-mounted.crt");
    let key = pki.path("klaus-mounted.key");
    std::fs::copy(&pki.klaus.cert, &cert).expect("copy");
    std::fs::copy(&pki.klaus.key, &key).expect("copy");
    let mut serve = serve_args();
    serve.tls_reload_interval_seconds = 1;
    let mut args = petra_args(&petra.https_url(), Some(pki.ca_file.clone()), None);
    args.petra_client_cert_file = Some(cert.clone());
    args.petra_client_key_file = Some(key.clone());
    let klaus = spawn(klaus::service(loopback(), &serve, &args).expect("Klaus")).await;

    // A key cut off half-way, as a copy interrupted by the rotation would leave it.
    let pem = std::fs::read_to_string(&pki.klaus.key).expect("key");
    put(&key, &pem[..pem.len() / 2]);
    wait_until(
        "the broken set is counted",
        Duration::from_secs(10),
        || async {
            value(
                &klaus.metrics().await,
                r#"petra_tls_reloads_total{result="error"}"#,
            ) == 1.0
        },
    )
    .await;
    // Klaus keeps what it had, also on new connections (Petra closes each after a second).
    let accepted = |text: String| value(&text, "connections_accepted_total");
    let before = accepted(petra.metrics().await);
    wait_until(
        "Klaus on a new connection",
        Duration::from_secs(10),
        || async {
            assert_eq!(get(&klaus.http_url()).await.2, "hello world");
            accepted(petra.metrics().await) > before
        },
    )
    .await;
    assert_eq!(
        value(
            &klaus.metrics().await,
            r#"petra_tls_reloads_total{result="ok"}"#
        ),
        0.0
    );
    klaus.stop().await;
    petra.stop().await;
}
