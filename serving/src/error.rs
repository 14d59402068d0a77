//! The one error of invalid configuration: which variable to fix and what is wrong with it,
//! printed as one line before the process exits with status 2.

use std::process::ExitCode;

/// The exit status for invalid configuration, as for any usage error.
pub const EXIT_CONFIG: u8 = 2;

/// Invalid configuration: which variable to fix, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {problem}")]
pub struct ConfigError {
    /// The environment variable (the flag has the same name in kebab case).
    pub var: &'static str,
    /// What is wrong, in words an operator can act on.
    pub problem: String,
}

impl ConfigError {
    /// An error about the variable `var`.
    pub fn new(var: &'static str, problem: impl Into<String>) -> Self {
        Self {
            var,
            problem: problem.into(),
        }
    }

    /// Prints the error as one line on stderr and returns the configuration exit status.
    pub fn exit(&self) -> ExitCode {
        eprintln!("error: {self}");
        ExitCode::from(EXIT_CONFIG)
    }
}
