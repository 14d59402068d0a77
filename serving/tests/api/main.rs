//! Tests of serving's own server and TLS behaviour, through a stand-in service that answers
//! `GET /` with `hello` behind the same middleware as the services: hostile clients,
//! connection and head limits, certificate reloads, TLS versions and client identities.

mod helpers;
mod hostile;
mod https;
mod limits;
mod reload;
