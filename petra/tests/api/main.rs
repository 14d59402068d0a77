//! Petra's integration tests: the service in process on free ports with certificates made on
//! the spot, and the built binary for configuration errors and shutdown.

mod binary;
mod helpers;
mod hostile;
mod https;
mod limits;
mod reload;
