//! Petra's integration tests: the service in process on free ports with certificates made on
//! the spot, and the built binary for configuration errors and shutdown. The server's and
//! TLS's own behaviour (hostile clients, limits, reloads) is tested in serving/tests.

mod binary;
mod helpers;
mod https;
