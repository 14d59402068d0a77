//! Klaus's integration tests: Klaus and a real (or fake) Petra in process on free ports with
//! certificates made on the spot, and the built binary for configuration errors and shutdown.

mod binary;
mod clients;
mod distance;
mod errors;
mod faults;
mod hello;
mod helpers;
mod metrics_doc;
mod resilience;
mod rotation;
mod solo;
mod traces;
mod upstream;
