//! `cargo xtask up`: runs the pair from `docker-compose.yml` on any machine with Docker, the same as
//! `docker compose up --build`, except that it first makes sure the Rust builder image the
//! Dockerfile starts from is there: pulled where a registry answers, made from debootstrap and this
//! machine's Rust toolchain where none does ([`crate::images`]). Everything after the flags goes to
//! `compose up` as it is (`cargo xtask up -d`).

use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{root, shell, step};

/// The flags of `cargo xtask up`.
#[derive(Debug, clap::Args)]
pub(crate) struct UpArgs {
    /// A compose file to use instead of docker-compose.yml; repeat it to combine files, as with
    /// `docker compose -f` (for example docker-compose.yml and docker-compose.observability.yml).
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    files: Vec<String>,
    /// Passed on to `compose up --build`, for example `-d` to run in the background.
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "UP_ARGS"
    )]
    up_args: Vec<String>,
}

/// Makes the builder image if it is missing, then runs `compose up --build` in the foreground and
/// ends with its exit status.
pub(crate) fn up(args: &UpArgs) -> anyhow::Result<()> {
    let sh = shell()?;
    step("docker is reachable", || crate::images::ensure_docker(&sh))?;
    let compose = step("compose is installed", || crate::e2e::compose_command(&sh))?;
    step("the Rust builder image", || {
        crate::images::ensure_builder_image(&sh)
    })?;
    let mut command = compose_up(&compose, args)?;
    println!("running {}", describe(&command));
    let status = command
        .status()
        .with_context(|| format!("cannot run {}", compose.join(" ")))?;
    if !status.success() {
        bail!("{} ended with {status}", describe(&command));
    }
    Ok(())
}

/// `compose [-f FILE]... up --build UP_ARGS...`, run from the workspace root.
fn compose_up(compose: &[String], args: &UpArgs) -> anyhow::Result<Command> {
    let (program, subcommand) = compose.split_first().context("an empty compose command")?;
    let mut command = Command::new(program);
    command.current_dir(root()).args(subcommand);
    for file in &args.files {
        command.args(["-f", file]);
    }
    command.args(["up", "--build"]).args(&args.up_args);
    Ok(command)
}

/// A command as one would type it.
fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        up: UpArgs,
    }

    fn typed(compose: &[&str], line: &[&str]) -> String {
        let cli = Cli::try_parse_from(std::iter::once("up").chain(line.iter().copied()))
            .expect("valid flags");
        let compose: Vec<String> = compose.iter().map(|part| (*part).to_owned()).collect();
        describe(&compose_up(&compose, &cli.up).expect("a command"))
    }

    #[test]
    fn files_go_before_up_and_everything_after_the_flags_goes_to_up() {
        assert_eq!(typed(&["docker-compose"], &[]), "docker-compose up --build");
        assert_eq!(
            typed(
                &["docker", "compose"],
                &[
                    "-f",
                    "docker-compose.yml",
                    "-f",
                    "docker-compose.observability.yml",
                    "-d",
                    "--wait"
                ]
            ),
            "docker compose -f docker-compose.yml -f docker-compose.observability.yml up --build -d --wait"
        );
    }

    #[test]
    fn an_empty_compose_command_is_an_error() {
        let cli = Cli::try_parse_from(["up"]).expect("no flags");
        assert!(compose_up(&[], &cli.up).is_err());
    }
}
