//! Petra answers `GET /` with `hello`, over HTTPS only, optionally requiring client
//! certificates (mutual TLS).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::get;
use clap::{CommandFactory, Parser, Subcommand};
use prometheus_client::registry::Registry;
use serving::admission::Admission;
use serving::metrics::HttpMetrics;
use serving::observe;
use serving::trace::Tracer;
use serving::{ConfigError, ServeArgs, Service};

/// Petra's command line; every option is also an environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "petra",
    version,
    about = "Petra answers GET / with `hello`, over HTTPS (optionally mutual TLS)."
)]
pub struct Cli {
    /// Address of the main (HTTPS) listener.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8443")]
    pub listen_addr: SocketAddr,

    #[command(flatten)]
    pub serve: ServeArgs,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Petra's subcommands; without one, Petra serves.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe this service's own /livez on ADMIN_ADDR; exit 0 when healthy, 1 otherwise.
    Healthcheck,
    /// Write a private CA, Petra's server certificate and Klaus's client certificate.
    Certs(serving::certs::CertsArgs),
    /// Print the service's contract (ports, admin paths, environment variables) as JSON.
    #[command(hide = true)]
    Contract,
}

/// The body of `GET /`.
pub const HELLO: &str = "hello";

/// Petra's routes, with request ids, admission control, metrics and logs.
pub fn router(metrics: HttpMetrics, admission: Arc<Admission>, tracer: Tracer) -> Router {
    let routes = Router::new()
        .route("/", get(hello))
        .fallback(observe::not_found)
        .method_not_allowed_fallback(observe::method_not_allowed);
    observe::layer(routes, metrics, admission, tracer)
}

async fn hello() -> Response {
    observe::plain(StatusCode::OK, HELLO)
}

/// Builds the service from its configuration. Petra serves HTTPS only: without
/// TLS_CERT_FILE and TLS_KEY_FILE it is a configuration error.
pub fn service(listen_addr: SocketAddr, serve: &ServeArgs) -> Result<Service, ConfigError> {
    let Some(tls) = serve.tls_files()? else {
        return Err(ConfigError::new(
            "TLS_CERT_FILE, TLS_KEY_FILE",
            "not set; Petra serves HTTPS only (make them with `petra certs --out DIR`)",
        ));
    };
    let mut registry = Registry::default();
    let metrics = HttpMetrics::register(&mut registry);
    let admission = Admission::new(serve.admission(), &mut registry);
    let tracer = serve.tracer("petra", &mut registry)?;
    let routes = router(metrics, Arc::clone(&admission), tracer);
    Ok(Service::new(
        "petra",
        serve,
        listen_addr,
        routes,
        Some(tls),
        registry,
        admission,
    ))
}

/// Runs the command line: serve, or one of the subcommands.
pub fn main(cli: Cli) -> ExitCode {
    match cli.command {
        Some(Command::Healthcheck) => serving::healthcheck::run(cli.serve.admin_addr),
        Some(Command::Certs(args)) => match serving::certs::write(&args) {
            Ok(report) => {
                for line in report.lines {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Contract) => {
            println!("{}", serving::contract::describe("petra", &Cli::command()));
            ExitCode::SUCCESS
        }
        None => serving::run(|| service(cli.listen_addr, &cli.serve), &cli.serve),
    }
}
