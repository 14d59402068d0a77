//! Helpers for the services' integration tests: certificates made on the spot ([`TestPki`]),
//! services started on free loopback ports ([`spawn`]), service binaries run as processes
//! ([`Binary`]), clients, and waiting on conditions under a deadline.

mod binary;
mod client;
mod pki;
mod spawn;
mod wait;

pub use binary::{Binary, assert_config_errors, run_to_exit};
pub use client::{
    Handshake, TlsStream, client, client_builder, handshake, plain_client, tls_connect,
};
pub use pki::{Files, TestPki, foreign_client, klaus_names, server_cert, write_pem};
pub use spawn::{Running, loopback, refused_addr, serve_args, spawn, tls_serve_args};
pub use wait::wait_until;
