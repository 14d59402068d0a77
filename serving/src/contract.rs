//! The service's external contract (ports, admin paths, environment variables) as JSON, read
//! from the command-line definition itself, so that the manifests and the compose file can be
//! checked against what the binary really reads.

use std::net::SocketAddr;

use serde_json::{Value, json};

/// Variables read outside clap.
const EXTRA_ENV: &[(&str, &str)] = &[("RUST_LOG", "info")];

/// Describes `command` (the service's clap command) as JSON: every environment variable with
/// its default and whether it is required, the default ports, and the admin paths.
pub fn describe(service: &str, command: &clap::Command) -> Value {
    let mut env = Vec::new();
    for arg in command.get_arguments() {
        let Some(name) = arg.get_env() else { continue };
        let default = arg
            .get_default_values()
            .first()
            .map(|value| value.to_string_lossy().into_owned());
        env.push(json!({
            "name": name.to_string_lossy(),
            "default": default,
            "required": arg.is_required_set(),
        }));
    }
    for (name, default) in EXTRA_ENV {
        env.push(json!({ "name": name, "default": default, "required": false }));
    }
    let port = |var: &str| {
        command
            .get_arguments()
            .find(|arg| arg.get_env().is_some_and(|env| env == var))
            .and_then(|arg| arg.get_default_values().first().cloned())
            .and_then(|value| value.to_str()?.parse::<SocketAddr>().ok())
            .map(|addr| addr.port())
    };
    json!({
        "service": service,
        "ports": { "main": port("LISTEN_ADDR"), "admin": port("ADMIN_ADDR") },
        "paths": {
            "livez": crate::admin::LIVEZ,
            "readyz": crate::admin::READYZ,
            "metrics": crate::admin::METRICS,
        },
        "env": env,
    })
}
