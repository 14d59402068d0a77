//! A stand-in service on serving's server, started in the test process.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::registry::Registry;
use serving::admission::Admission;
use serving::metrics::HttpMetrics;
use serving::observe;
use serving::testing::{Running, TestPki, loopback, spawn, tls_serve_args};
use serving::{ConfigError, ServeArgs, Service};

/// The service `serve` describes, answering `GET /` with `hello` behind the middleware the
/// services use (request ids, admission control, metrics, logs), as Petra does.
pub(crate) fn hello_service(
    listen_addr: SocketAddr,
    serve: &ServeArgs,
) -> Result<Service, ConfigError> {
    let tls = serve.tls_files()?;
    let mut registry = Registry::default();
    let metrics = HttpMetrics::register(&mut registry);
    let admission = Admission::new(serve.admission(), &mut registry);
    let tracer = serve.tracer("hello", &mut registry)?;
    let routes = Router::new()
        .route(
            "/",
            get(|| async { observe::plain(StatusCode::OK, "hello") }),
        )
        .fallback(observe::not_found)
        .method_not_allowed_fallback(observe::method_not_allowed);
    let router = observe::layer(routes, metrics, Arc::clone(&admission), tracer);
    Ok(Service::new(
        "hello",
        serve,
        listen_addr,
        router,
        tls,
        registry,
        admission,
    ))
}

/// The hello service with mutual TLS against `pki`'s CA.
pub(crate) async fn spawn_hello(pki: &TestPki) -> Running {
    spawn_with(tls_serve_args(pki, Some(&pki.ca_file))).await
}

/// The hello service with the given settings.
pub(crate) async fn spawn_with(args: ServeArgs) -> Running {
    spawn(hello_service(loopback(), &args).expect("valid configuration")).await
}
