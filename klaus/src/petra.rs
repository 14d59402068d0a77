//! The client Klaus calls Petra with: one pooled hyper client built at startup (trust anchors,
//! client identity, timeouts), Petra's base URL, and the errors a call can end in, each
//! answered as an RFC 9457 problem that tells an operator what to fix.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::header::{CONTENT_TYPE, USER_AGENT};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rustls::{AlertDescription, CertificateError};
use serving::ConfigError;
use serving::observe::{self, REQUEST_ID, TRACEPARENT};
use url::Url;

/// The largest body Klaus accepts from Petra.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How often Klaus pings Petra on an HTTP/2 connection, and how long it waits for the answer
/// before it closes the connection.
const H2_PING_INTERVAL: Duration = Duration::from_secs(5);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(3);

/// The W3C trace state header, passed on with `traceparent`.
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// Headers of the incoming request that Klaus passes on to Petra.
const FORWARDED: [HeaderName; 3] = [TRACEPARENT, TRACESTATE, REQUEST_ID];

/// The `user-agent` Klaus sends.
const KLAUS_AGENT: HeaderValue =
    HeaderValue::from_static(concat!("klaus/", env!("CARGO_PKG_VERSION")));

/// How many times a call is sent again at once, on the same client, when Petra refused its
/// stream unprocessed (HTTP/2 `REFUSED_STREAM`, or a graceful `GOAWAY` that came first).
/// These retries are free of the budget: Petra did no work, and the connection is going away.
const MAX_REFUSED_RETRIES: u32 = 2;

/// An error from the HTTP client, the connector or the deadline.
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How Klaus reaches Petra.
#[derive(Debug, Clone, clap::Args)]
pub struct PetraArgs {
    /// Petra's base URL, https only: https://HOST[:PORT][/PREFIX]. Klaus calls
    /// `GET {PETRA_URL}/`.
    #[arg(long, env = "PETRA_URL", required = true)]
    pub petra_url: Option<String>,

    /// PEM file with extra CA certificates trusted for Petra's certificate, on top of the
    /// system roots. Verification cannot be turned off.
    #[arg(long, env = "PETRA_CA_FILE")]
    pub petra_ca_file: Option<PathBuf>,

    /// PEM certificate chain Klaus presents to Petra (mutual TLS).
    #[arg(long, env = "PETRA_CLIENT_CERT_FILE")]
    pub petra_client_cert_file: Option<PathBuf>,

    /// PEM private key for PETRA_CLIENT_CERT_FILE (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "PETRA_CLIENT_KEY_FILE")]
    pub petra_client_key_file: Option<PathBuf>,

    /// Deadline in milliseconds for the whole call to Petra; connecting gets half of it.
    #[arg(long, env = "PETRA_TIMEOUT_MS", default_value_t = 2000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub petra_timeout_ms: u64,
}

/// Checks PETRA_URL: absolute, https, a host, no credentials, query or fragment. The result
/// ends in `/`, so that it is the URL Klaus calls.
pub fn parse_url(raw: &str) -> Result<Url, ConfigError> {
    const VAR: &str = "PETRA_URL";
    let mut url = Url::parse(raw.trim()).map_err(|err| {
        ConfigError::new(
            VAR,
            format!("'{raw}' is not an absolute URL ({err}); expected https://HOST[:PORT]"),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            return Err(ConfigError::new(
                VAR,
                format!("'{raw}' uses http; Klaus calls Petra over https only (use https://)"),
            ));
        }
        other => {
            return Err(ConfigError::new(
                VAR,
                format!("'{raw}' has scheme '{other}'; use https://"),
            ));
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(VAR, format!("'{raw}' has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            VAR,
            "must not carry credentials; Klaus authenticates with its client certificate",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigError::new(
            VAR,
            format!("'{raw}' must not have a query or fragment"),
        ));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// Checks Petra's body: at most [`MAX_BODY_BYTES`], UTF-8 text.
pub fn body_text(body: Vec<u8>) -> Result<String, PetraError> {
    if body.len() > MAX_BODY_BYTES {
        return Err(PetraError::TooLarge);
    }
    String::from_utf8(body).map_err(|_| PetraError::NotText)
}

/// Retries allowed: at most [`RetryBudget::MAX_TOKENS`] at once, refilled by a tenth of a
/// retry for each successful call, so that retries add at most about 10 % to the load on a
/// healthy Petra and stop altogether when Petra is really down.
#[derive(Debug)]
struct RetryBudget {
    /// Thousandths of a retry.
    milli_tokens: AtomicU64,
}

impl RetryBudget {
    const MAX_TOKENS: u64 = 20;
    const PER_SUCCESS_MILLI: u64 = 100;

    fn withdraw(&self) -> bool {
        self.milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                tokens.checked_sub(1000)
            })
            .is_ok()
    }

    fn deposit(&self) {
        let _ = self
            .milli_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |tokens| {
                (tokens < Self::MAX_TOKENS * 1000)
                    .then(|| (tokens + Self::PER_SUCCESS_MILLI).min(Self::MAX_TOKENS * 1000))
            });
    }
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            milli_tokens: AtomicU64::new(Self::MAX_TOKENS * 1000),
        }
    }
}

/// Calls to Petra by outcome, and their latency.
#[derive(Debug, Clone)]
pub struct PetraMetrics {
    calls: Family<OutcomeLabel, Counter>,
    retries: Family<RetryLabel, Counter>,
    duration: Family<OutcomeLabel, Histogram, fn() -> Histogram>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

impl PetraMetrics {
    /// Registers `petra_calls_total` and `petra_call_duration_seconds`, labelled by outcome.
    pub fn register(registry: &mut Registry) -> Self {
        let this = Self {
            calls: Family::default(),
            retries: Family::default(),
            duration: Family::new_with_constructor(serving::metrics::latency_histogram),
        };
        registry.register(
            "petra_calls",
            "Calls from Klaus to Petra, by outcome",
            this.calls.clone(),
        );
        registry.register(
            "petra_retries",
            "Retries of failed calls on a fresh connection: attempted, or skipped (budget spent or deadline passed)",
            this.retries.clone(),
        );
        registry.register(
            "petra_call_duration_seconds",
            "Duration of calls from Klaus to Petra, by outcome",
            this.duration.clone(),
        );
        this
    }

    fn retry(&self, result: &'static str) {
        self.retries.get_or_create(&RetryLabel { result }).inc();
    }

    fn record(&self, outcome: &'static str, elapsed: Duration) {
        let label = OutcomeLabel { outcome };
        self.calls.get_or_create(&label).inc();
        self.duration
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }
}

/// The one client Klaus uses for Petra, built at startup and shared by every request, so that
/// connections (and TLS sessions) are reused.
#[derive(Debug, Clone)]
pub struct PetraClient {
    inner: Arc<Inner>,
}

/// The HTTP client for one [`Profile`].
type HttpClient = Client<Connector, Empty<Bytes>>;

#[derive(Debug)]
struct Inner {
    http: HttpClient,
    fresh: HttpClient,
    budget: RetryBudget,
    url: Url,
    /// `url` as the request target, parsed once.
    uri: Uri,
    timeout_ms: u64,
    metrics: PetraMetrics,
}

impl PetraClient {
    /// Checks the settings and builds the client. Every error names the variable to fix.
    pub fn new(args: &PetraArgs, metrics: PetraMetrics) -> Result<Self, ConfigError> {
        let raw = args.petra_url.as_deref().ok_or_else(|| {
            ConfigError::new("PETRA_URL", "is not set; set it to Petra's https:// URL")
        })?;
        let url = parse_url(raw)?;
        let uri = url.as_str().parse::<Uri>().map_err(|err| {
            ConfigError::new(
                "PETRA_URL",
                format!("'{raw}' is not a valid request URI ({err})"),
            )
        })?;
        // The system's roots are read once (about 10 ms), for both clients.
        let tls = tls_config(args)?;
        let http = build_client(args, tls.clone(), Profile::Pooled)?;
        let fresh = build_client(args, tls, Profile::Fresh)?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                fresh,
                url,
                uri,
                timeout_ms: args.petra_timeout_ms,
                budget: RetryBudget::default(),
                metrics,
            }),
        })
    }

    /// The URL Klaus calls.
    pub fn url(&self) -> &Url {
        &self.inner.url
    }

    /// Calls `GET {PETRA_URL}/`, passing on the trace context and request id of `incoming`,
    /// and returns Petra's body.
    pub async fn hello(&self, incoming: &HeaderMap) -> Result<String, PetraError> {
        let started = Instant::now();
        let result = self.call(incoming).await;
        let outcome = result.as_ref().map_or_else(PetraError::outcome, |_| "ok");
        self.inner.metrics.record(outcome, started.elapsed());
        result
    }

    /// One call, retried once on a fresh connection when the first attempt could not reach
    /// Petra (a pooled connection closed under it, or a replica that just went away) and the
    /// retry budget allows. The retry gets what is left of the deadline.
    async fn call(&self, incoming: &HeaderMap) -> Result<String, PetraError> {
        let inner = &*self.inner;
        let deadline = Duration::from_millis(inner.timeout_ms);
        let started = Instant::now();
        let result = match self.attempt(&inner.http, incoming, deadline).await {
            Err(err) if err.is_retryable() => {
                let left = deadline.saturating_sub(started.elapsed());
                if left.is_zero() || !inner.budget.withdraw() {
                    inner.metrics.retry("skipped");
                    return Err(err);
                }
                inner.metrics.retry("attempted");
                tracing::debug!(error = %Chain(&err), "retrying the call to Petra on a fresh connection");
                self.attempt(&inner.fresh, incoming, left).await
            }
            other => other,
        };
        if result.is_ok() {
            inner.budget.deposit();
        }
        result
    }

    /// One attempt on `client`: the request sent and the body read within `timeout`.
    async fn attempt(
        &self,
        client: &HttpClient,
        incoming: &HeaderMap,
        timeout: Duration,
    ) -> Result<String, PetraError> {
        match tokio::time::timeout(timeout, self.exchange(client, incoming)).await {
            Ok(result) => result,
            Err(elapsed) => Err(PetraError::Timeout {
                timeout_ms: self.inner.timeout_ms,
                source: Box::new(elapsed),
            }),
        }
    }

    async fn exchange(
        &self,
        client: &HttpClient,
        incoming: &HeaderMap,
    ) -> Result<String, PetraError> {
        let mut refused = 0;
        let response = loop {
            match client.request(self.request(incoming)).await {
                Ok(response) => break response,
                Err(err) if refused < MAX_REFUSED_RETRIES && is_refused(&err) => refused += 1,
                Err(err) => return Err(self.classify(err.into())),
            }
        };
        let status = response.status();
        if !status.is_success() {
            return Err(PetraError::Status(status));
        }
        let mut body = response.into_body();
        if hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|len| len > MAX_BODY_BYTES as u64)
        {
            return Err(PetraError::TooLarge);
        }
        let mut text = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|err| self.classify(err.into()))?;
            if let Ok(chunk) = frame.into_data() {
                if text.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(PetraError::TooLarge);
                }
                text.extend_from_slice(&chunk);
            }
        }
        body_text(text)
    }

    /// `GET {PETRA_URL}/` with Klaus's user agent and the headers passed on from `incoming`.
    fn request(&self, incoming: &HeaderMap) -> Request<Empty<Bytes>> {
        let mut request = Request::new(Empty::new());
        *request.uri_mut() = self.inner.uri.clone();
        let headers = request.headers_mut();
        headers.insert(USER_AGENT, KLAUS_AGENT);
        for name in FORWARDED {
            if let Some(value) = incoming.get(&name) {
                headers.insert(name, observe::unique(value));
            }
        }
        request
    }

    fn classify(&self, err: BoxError) -> PetraError {
        let url = &self.inner.url;
        let target = format!(
            "{}:{}",
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or(443)
        );
        classify(err, target, self.inner.timeout_ms)
    }
}

/// The two clients Klaus keeps for Petra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// Every first attempt: HTTP/2 when Petra offers it (ALPN), else HTTP/1.1, with idle
    /// connections kept.
    Pooled,
    /// Retries: a new connection each time, never another pooled one that may have died with
    /// the first, and HTTP/1.1 only, where a certificate alert after the handshake always
    /// arrives as the answer to the request (over HTTP/2 the connection can end first, and the
    /// call then only says "closed"). Retries are rare, so this costs nothing on the hot path.
    Fresh,
}

/// Builds the HTTPS client for Petra on `tls` with the settings of `profile`, ALPN included.
fn build_client(
    args: &PetraArgs,
    mut tls: rustls::ClientConfig,
    profile: Profile,
) -> Result<HttpClient, ConfigError> {
    let timeout = Duration::from_millis(args.petra_timeout_ms);
    let pooled = profile == Profile::Pooled;
    let mut http = HttpConnector::new();
    // The TLS connector checks the scheme: https only.
    http.enforce_http(false);
    http.set_nodelay(true);
    // TCP keep-alive as reqwest set it, which Klaus used before: probes after 15 s idle,
    // every 15 s, 3 unanswered close the connection.
    http.set_keepalive(Some(Duration::from_secs(15)));
    http.set_keepalive_interval(Some(Duration::from_secs(15)));
    http.set_keepalive_retries(Some(3));
    tls.alpn_protocols = if pooled {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    // Built from its parts rather than by `HttpsConnectorBuilder`, which insists on setting
    // ALPN itself and, for HTTP/1.1 only, would offer none rather than http/1.1.
    let mut https = HttpsConnector::from((http, tls));
    https.enforce_https();
    let connector = Connector {
        https,
        timeout: timeout / 2,
    };
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        // HTTP/2 when Petra offers it (ALPN), else HTTP/1.1: one multiplexed connection
        // measured 29 % less CPU per request than a pool of HTTP/1.1 connections (fewer
        // system calls, BENCHMARKS.md). Petra closes connections gracefully after
        // MAX_CONNECTION_AGE_SECONDS, so that Klaus's calls spread over new replicas.
        .pool_idle_timeout(Duration::from_secs(50))
        .pool_max_idle_per_host(if pooled { usize::MAX } else { 0 })
        // A connection whose peer went silent (a cut link, a replica gone without a FIN)
        // would otherwise carry every call into its deadline until TCP gives up, minutes
        // later, and keep doing so for seconds after the link returns. A ping unanswered
        // within 3 s closes it, so new calls get a new connection.
        .http2_keep_alive_interval(H2_PING_INTERVAL)
        .http2_keep_alive_timeout(H2_PING_TIMEOUT)
        .http2_keep_alive_while_idle(true);
    // No proxy (service-to-service calls go straight to Petra, whatever HTTPS_PROXY says) and
    // no redirects: this client follows neither.
    Ok(builder.build(connector))
}

/// The HTTPS connector with a deadline on connecting, TCP and TLS handshake together.
#[derive(Debug, Clone)]
struct Connector {
    https: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

impl tower_service::Service<Uri> for Connector {
    type Response = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.https.poll_ready(cx)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let connecting = self.https.call(dst);
        let timeout = self.timeout;
        Box::pin(async move {
            tokio::time::timeout(timeout, connecting)
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connecting to Petra timed out",
                    )
                    .into())
                })
        })
    }
}

/// The TLS settings for calls to Petra, built once for both clients: the system's roots plus
/// PETRA_CA_FILE, Klaus's client identity, TLS 1.3 and 1.2 (ALPN is the client profile's).
/// Verification cannot be turned off.
fn tls_config(args: &PetraArgs) -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system roots leave PETRA_CA_FILE as the only trust anchor, which is what a
    // private CA needs anyway; a missing bundle is no reason to refuse to start.
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = &args.petra_ca_file {
        roots
            .roots
            .extend(serving::tls::load_roots("PETRA_CA_FILE", path)?.roots);
    }
    let builder = rustls::ClientConfig::builder_with_provider(serving::tls::provider())
        .with_protocol_versions(serving::tls::PROTOCOL_VERSIONS)
        .map_err(|err| ConfigError::new("PETRA_CA_FILE", format!("TLS settings: {err}")))?
        .with_root_certificates(roots);
    let config = match (&args.petra_client_cert_file, &args.petra_client_key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(ConfigError::new(
                "PETRA_CLIENT_KEY_FILE",
                "is not set, but PETRA_CLIENT_CERT_FILE is; set both or neither",
            ));
        }
        (None, Some(_)) => {
            return Err(ConfigError::new(
                "PETRA_CLIENT_CERT_FILE",
                "is not set, but PETRA_CLIENT_KEY_FILE is; set both or neither",
            ));
        }
        (Some(cert), Some(key)) => {
            let identity = serving::tls::Identity::load(
                "PETRA_CLIENT_CERT_FILE",
                cert,
                "PETRA_CLIENT_KEY_FILE",
                key,
            )?;
            builder
                .with_client_auth_cert(identity.chain, identity.key)
                .map_err(|err| {
                    ConfigError::new(
                        "PETRA_CLIENT_CERT_FILE",
                        format!("{} cannot be used: {err}", cert.display()),
                    )
                })?
        }
    };
    Ok(config)
}

/// What went wrong with a TLS connection to Petra.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsProblem {
    /// Petra's certificate does not chain to a trusted CA.
    UnknownCa,
    /// Petra's certificate is not valid for the host in PETRA_URL.
    WrongName,
    /// Petra's certificate has expired.
    Expired,
    /// Petra's certificate is not valid yet.
    NotYetValid,
    /// Petra asked for a client certificate and Klaus has none.
    ClientCertRequired,
    /// Petra refused Klaus's client certificate.
    ClientCertRefused,
    /// Any other handshake failure.
    Other,
}

impl TlsProblem {
    fn of(err: &rustls::Error) -> Self {
        match err {
            rustls::Error::InvalidCertificate(cert) => match cert {
                CertificateError::UnknownIssuer | CertificateError::BadSignature => Self::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::WrongName,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotYetValid
                }
                _ => Self::Other,
            },
            rustls::Error::AlertReceived(AlertDescription::CertificateRequired) => {
                Self::ClientCertRequired
            }
            rustls::Error::AlertReceived(
                AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::AccessDenied,
            ) => Self::ClientCertRefused,
            _ => Self::Other,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Self::UnknownCa => "petra_tls_unknown_ca",
            Self::WrongName => "petra_tls_wrong_name",
            Self::Expired => "petra_tls_expired",
            Self::NotYetValid => "petra_tls_not_yet_valid",
            Self::ClientCertRequired => "petra_tls_client_cert_required",
            Self::ClientCertRefused => "petra_tls_client_cert_refused",
            Self::Other => "petra_tls_failed",
        }
    }

    fn detail(self, target: &str) -> String {
        match self {
            Self::UnknownCa => format!(
                "Petra's certificate at {target} is not signed by a CA Klaus trusts; put Petra's CA in PETRA_CA_FILE"
            ),
            Self::WrongName => format!(
                "Petra's certificate is not valid for {target}; make PETRA_URL use a name the certificate carries, or reissue it"
            ),
            Self::Expired => format!("Petra's certificate at {target} has expired; renew it"),
            Self::NotYetValid => {
                format!(
                    "Petra's certificate at {target} is not valid yet; check its dates and the clocks"
                )
            }
            Self::ClientCertRequired => format!(
                "Petra at {target} requires a client certificate; set PETRA_CLIENT_CERT_FILE and PETRA_CLIENT_KEY_FILE"
            ),
            Self::ClientCertRefused => format!(
                "Petra at {target} refused Klaus's client certificate; it must be issued by the CA in Petra's TLS_CLIENT_CA_FILE and be valid"
            ),
            Self::Other => format!("the TLS handshake with Petra at {target} failed"),
        }
    }
}

/// Why a call to Petra failed. Each variant's doc names the status Klaus answers with.
#[derive(Debug, thiserror::Error)]
pub enum PetraError {
    /// 504: Petra did not answer within PETRA_TIMEOUT_MS.
    #[error("Petra did not answer within {timeout_ms} ms")]
    Timeout {
        /// The deadline.
        timeout_ms: u64,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 502: Petra's certificate, or Klaus's, was not accepted.
    #[error("TLS with Petra failed: {problem:?}")]
    Tls {
        /// What went wrong.
        problem: TlsProblem,
        /// Where Klaus tried to connect.
        target: String,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 502: Petra could not be reached, or the connection broke.
    #[error("{detail}")]
    Unreachable {
        /// What happened, for the client.
        detail: String,
        /// Whether the request surely did not reach Petra's handler, or the connection died
        /// under it, so that another attempt on a fresh connection may succeed.
        retryable: bool,
        /// The client's error.
        #[source]
        source: BoxError,
    },
    /// 502: Petra answered with a status other than 2xx.
    #[error("Petra answered with status {0}")]
    Status(StatusCode),
    /// 502: Petra's body was over [`MAX_BODY_BYTES`].
    #[error("Petra's answer is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge,
    /// 502: Petra's body was not UTF-8 text.
    #[error("Petra's answer is not UTF-8 text")]
    NotText,
}

impl PetraError {
    /// Whether a retry on a fresh connection may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unreachable {
                retryable: true,
                ..
            }
        )
    }

    /// The outcome label in the metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls_error",
            Self::Unreachable { .. } => "unreachable",
            Self::Status(_) => "bad_status",
            Self::TooLarge | Self::NotText => "bad_body",
        }
    }

    /// The status Klaus answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// A machine-readable code for the problem body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Timeout { .. } => "petra_timeout",
            Self::Tls { problem, .. } => problem.code(),
            Self::Unreachable { .. } => "petra_unreachable",
            Self::Status(_) => "petra_bad_status",
            Self::TooLarge => "petra_body_too_large",
            Self::NotText => "petra_body_not_text",
        }
    }

    /// The problem's detail: what went wrong, in words an operator can act on, with no
    /// internals.
    pub fn detail(&self) -> String {
        match self {
            Self::Timeout { timeout_ms, .. } => {
                format!("Petra did not answer within {timeout_ms} ms (PETRA_TIMEOUT_MS)")
            }
            Self::Tls {
                problem, target, ..
            } => problem.detail(target),
            other => other.to_string(),
        }
    }
}

/// Whether Petra refused the request unprocessed, so that it may be sent again at once: a
/// stream Petra reset with `REFUSED_STREAM`, or one a graceful `GOAWAY` came before.
fn is_refused(err: &hyper_util::client::legacy::Error) -> bool {
    use std::error::Error as _;
    // The client's error wraps hyper's, which wraps h2's.
    let Some(h2) = err
        .source()
        .and_then(|hyper| hyper.source())
        .and_then(|cause| cause.downcast_ref::<h2::Error>())
    else {
        return false;
    };
    h2.is_remote()
        && ((h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR))
            || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Whether `err` is a timeout: connecting took longer than its share of the deadline, or an
/// HTTP/2 ping went unanswered.
fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if current.is::<tokio::time::error::Elapsed>()
            || current
                .downcast_ref::<hyper::Error>()
                .is_some_and(hyper::Error::is_timeout)
            || current
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cause = current.source();
    }
    false
}

/// Sorts a client error into a [`PetraError`] by looking through its chain of causes.
fn classify(err: BoxError, target: String, timeout_ms: u64) -> PetraError {
    if is_timeout(&*err) {
        return PetraError::Timeout {
            timeout_ms,
            source: err,
        };
    }
    let mut io_kind = None;
    let mut dns = false;
    let mut closed = false;
    let mut connect = false;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
    while let Some(current) = cause {
        if let Some(client) = current.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= client.is_connect();
        }
        if let Some(problem) = tls_problem(current) {
            return PetraError::Tls {
                problem,
                target,
                source: err,
            };
        }
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(innermost_kind(io));
        }
        if let Some(hyper) = current.downcast_ref::<hyper::Error>() {
            closed |= hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed();
        }
        if let Some(h2) = current.downcast_ref::<h2::Error>() {
            // Petra never started on a stream it refused, or one above the last it accepted
            // before going away (a replica draining for a restart).
            closed |= h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.is_remote());
        }
        dns |= current.to_string().starts_with("dns error");
        cause = current.source();
    }
    use std::io::ErrorKind;
    let retryable = !dns
        && (closed
            || matches!(
                io_kind,
                Some(
                    ErrorKind::ConnectionRefused
                        | ErrorKind::ConnectionReset
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::BrokenPipe
                        | ErrorKind::UnexpectedEof
                )
            ));
    let detail = match io_kind {
        _ if dns => format!("Petra's host name in {target} does not resolve; check PETRA_URL"),
        Some(ErrorKind::ConnectionRefused) => {
            format!(
                "Petra refused the connection at {target}; is Petra running, and is PETRA_URL right?"
            )
        }
        Some(
            ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::UnexpectedEof,
        ) => {
            format!("the connection to Petra at {target} was closed before Petra answered")
        }
        _ if connect => format!("Klaus could not connect to Petra at {target}"),
        _ if closed => {
            format!("the connection to Petra at {target} was closed before Petra answered")
        }
        _ => format!("the call to Petra at {target} failed before Petra answered"),
    };
    PetraError::Unreachable {
        detail,
        retryable,
        source: err,
    }
}

/// The TLS problem `err` reports, also when it sits inside (nested) `io::Error`s, whose
/// `source` skips the error they wrap.
fn tls_problem(err: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(TlsProblem::of(tls));
    }
    let io = err.downcast_ref::<std::io::Error>()?;
    match io.get_ref() {
        Some(inner) if inner.is::<rustls::Error>() || inner.is::<std::io::Error>() => {
            tls_problem(inner)
        }
        // An alert that arrives after the handshake (TLS 1.3 checks the client certificate
        // then) ends the HTTP/2 connection; h2 hands it to each stream as an `io::Error` that
        // keeps only the alert's text. That text is rustls's own, so it is compared with what
        // rustls writes for each alert rather than with a copy of it.
        Some(inner) => {
            let text = inner.to_string();
            ALERTS_AFTER_HANDSHAKE.into_iter().find_map(|alert| {
                let received = rustls::Error::AlertReceived(alert);
                (received.to_string() == text).then(|| TlsProblem::of(&received))
            })
        }
        None => None,
    }
}

/// The alerts a server sends about the client's certificate, once the client has finished
/// its side of the handshake.
const ALERTS_AFTER_HANDSHAKE: [AlertDescription; 8] = [
    AlertDescription::CertificateRequired,
    AlertDescription::BadCertificate,
    AlertDescription::UnknownCA,
    AlertDescription::CertificateUnknown,
    AlertDescription::UnsupportedCertificate,
    AlertDescription::CertificateExpired,
    AlertDescription::CertificateRevoked,
    AlertDescription::AccessDenied,
];

/// The kind of the innermost `io::Error` in `io`: the connector wraps a reset or an early EOF
/// in the handshake as `Other`, and `source` skips the error an `io::Error` wraps.
fn innermost_kind(io: &std::io::Error) -> std::io::ErrorKind {
    match io
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<std::io::Error>())
    {
        Some(inner) => innermost_kind(inner),
        None => io.kind(),
    }
}

/// The cause chain of an error on one line, for the log.
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(current) = cause {
            write!(f, ": {current}")?;
            cause = current.source();
        }
        Ok(())
    }
}

impl IntoResponse for PetraError {
    fn into_response(self) -> Response {
        let status = self.status();
        tracing::warn!(code = self.code(), status = status.as_u16(), error = %Chain(&self), "call to Petra failed");
        let body = serde_json::json!({
            "type": "about:blank",
            "title": status.canonical_reason().unwrap_or("Bad Gateway"),
            "status": status.as_u16(),
            "detail": self.detail(),
            "code": self.code(),
        });
        (
            status,
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("application/problem+json"),
            )],
            body.to_string(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn petra_url_must_be_https_with_a_host() {
        assert_eq!(
            parse_url("https://petra:8443").expect("valid").as_str(),
            "https://petra:8443/"
        );
        assert_eq!(
            parse_url("https://petra/api").expect("valid").as_str(),
            "https://petra/api/"
        );
        for (bad, says) in [
            ("http://petra:8443", "uses http"),
            ("petra:8443", "scheme 'petra'"),
            ("not a url", "not an absolute URL"),
            ("ftp://petra", "scheme 'ftp'"),
            ("https://user:pw@petra", "credentials"),
            ("https://petra/?q=1", "query"),
            ("", "not an absolute URL"),
        ] {
            let err = parse_url(bad).expect_err(bad);
            assert_eq!(err.var, "PETRA_URL");
            assert!(err.problem.contains(says), "{bad}: {}", err.problem);
        }
    }
}
