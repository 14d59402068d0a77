//! Klaus, the edge service: answers `GET /` with Petra's `hello` followed by ` world`, calling
//! Petra over HTTPS with mutual TLS through one client over every Petra endpoint
//! ([`upstream`]).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header::CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::{CommandFactory, Parser, Subcommand};
use prometheus_client::registry::Registry;
use serving::admission::Admission;
use serving::metrics::HttpMetrics;
use serving::observe;
use serving::trace::{Span, Tracer};
use serving::{ConfigError, ServeArgs, Service};

pub mod upstream;

pub use upstream::{ErrorDetail, PetraArgs, PetraClient, PetraError, Resolve, SystemResolver};

/// Klaus's command line; every option is also an environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "klaus",
    version,
    about = "Klaus calls Petra over HTTPS with mutual TLS and answers GET / with `hello world`.",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Address of the main listener: plain HTTP, or HTTPS when TLS_CERT_FILE and TLS_KEY_FILE
    /// are set.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(flatten)]
    pub petra: PetraArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Klaus's subcommands; without one, Klaus serves.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe this service's own /livez on ADMIN_ADDR; exit 0 when healthy, 1 otherwise.
    Healthcheck,
    /// Print the service's contract (ports, admin paths, environment variables) as JSON.
    #[command(hide = true)]
    Contract,
}

/// What Klaus appends to Petra's answer.
pub const SUFFIX: &str = " world";

/// Klaus's routes, with request ids, admission control, metrics and logs.
pub fn router(
    petra: PetraClient,
    metrics: HttpMetrics,
    admission: Arc<Admission>,
    tracer: Tracer,
) -> Router {
    let routes = Router::new()
        .route("/", get(hello))
        .fallback(observe::not_found)
        .method_not_allowed_fallback(observe::method_not_allowed)
        .with_state(petra);
    observe::layer(routes, metrics, admission, tracer)
}

/// Takes the whole request rather than a `HeaderMap`, which axum would clone. A failed call
/// is answered with a problem whose detail ERROR_DETAIL sets.
async fn hello(State(petra): State<PetraClient>, request: Request) -> Response {
    let (parts, _) = request.into_parts();
    // The middleware put the request's span there; a router built without it gets ids only.
    let span = match parts.extensions.get::<Span>() {
        Some(span) => span.clone(),
        None => Tracer::ids_only().server(&parts.headers, || "GET /".into(), Vec::new),
    };
    let mut text = match petra.hello(&parts.headers, &span).await {
        Ok(text) => text,
        Err(err) => return err.response(petra.error_detail()),
    };
    text.push_str(SUFFIX);
    (
        StatusCode::OK,
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// Builds the service from its configuration: the Petra client (checked now, so that a bad
/// URL or certificate fails at startup, not on the first request) and the routes. Petra's
/// host names are resolved with the system's resolver.
pub fn service(
    listen_addr: SocketAddr,
    serve: &ServeArgs,
    petra: &PetraArgs,
) -> Result<Service, ConfigError> {
    service_with(listen_addr, serve, petra, Arc::new(SystemResolver))
}

/// [`service`] with Petra's host names resolved by `resolver`.
pub fn service_with(
    listen_addr: SocketAddr,
    serve: &ServeArgs,
    petra: &PetraArgs,
    resolver: Arc<dyn Resolve>,
) -> Result<Service, ConfigError> {
    let tls = serve.tls_files()?;
    let mut registry = Registry::default();
    let metrics = HttpMetrics::register(&mut registry);
    let client = PetraClient::new(
        petra,
        resolver,
        upstream::PetraMetrics::register(&mut registry),
    )?;
    let admission = Admission::new(serve.admission(), &mut registry);
    let tracer = serve.tracer("klaus", &mut registry)?;
    let routes = router(client.clone(), metrics, Arc::clone(&admission), tracer);
    let mut service = Service::new(
        "klaus",
        serve,
        listen_addr,
        routes,
        tls,
        registry,
        admission,
    );
    // Discovery and the client's certificate reloads run while Klaus serves, on the same
    // interval as the listener's.
    let reload = (serve.tls_reload_interval_seconds > 0)
        .then(|| Duration::from_secs(serve.tls_reload_interval_seconds));
    service.tasks.push(move |stop| client.start(reload, stop));
    Ok(service)
}

/// Runs the command line: serve, or one of the subcommands.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Healthcheck) => serving::healthcheck::run(cli.serve.admin_addr),
        Some(Command::Contract) => {
            println!("{}", serving::contract::describe("klaus", &Cli::command()));
            ExitCode::SUCCESS
        }
        None => serving::run(
            || service(cli.listen_addr, &cli.serve, &cli.petra),
            &cli.serve,
        ),
    }
}
