//! `cargo xtask images`: builds `petra:dev`, `klaus:dev`, `slowlink:dev` and `tracesink:dev` from
//! the `Dockerfile` stage of that name (slowlink is the link that docker-compose.split.yml puts between Klaus and
//! Petra; tracesink the trace receiver of docker-compose.observability.yml).
//!
//! No image can be pulled on our machines, so the Rust builder image that the Dockerfiles start from is made
//! here when it is missing ([`builder`]): a Debian root file system from `debootstrap` plus this machine's Rust toolchain,
//! imported under the official image's name. It stays in Docker's image store, so later runs skip that part.
//! After the builds, each image must carry its CycloneDX SBOM and a binary with its crates embedded (`sbom`).

use std::collections::BTreeMap;
use std::fs;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use xshell::{Shell, cmd};

use crate::util::{root, shell, step};

mod builder;

use self::builder::{describe_builder, ensure_rust_image};

/// The services that get an image, each from the `Dockerfile` stage of that name, tagged `<name>:dev`.
pub(crate) const SERVICES: [&str; 4] = ["petra", "klaus", "slowlink", "tracesink"];

/// The size budget for each runtime image, in bytes as `docker image ls` counts them (1 MB = 10^6 bytes).
const IMAGE_BUDGET_BYTES: u64 = 10_000_000;

/// How long to wait for a Docker daemon this task started to answer.
const DOCKERD_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Builds every service image, making the Rust builder image first if the machine lacks it.
pub(crate) fn images() -> anyhow::Result<()> {
    let sh = shell()?;
    step("docker is reachable", || ensure_docker(&sh))?;
    step(
        "the Dockerfiles' stages and the Rust builder image they start from",
        || ensure_builder_image(&sh),
    )?;
    let revision = git_revision(&sh);
    let versions = package_versions(&sh)?;
    for service in SERVICES {
        let version = versions
            .get(service)
            .with_context(|| format!("cargo metadata has no package {service}"))?;
        step(&format!("docker build {service}:dev"), || {
            let tag = format!("{service}:dev");
            cmd!(
                sh,
                "docker build --force-rm --target {service} -t {tag} --build-arg GIT_REVISION={revision} --build-arg VERSION={version} ."
            )
            .run()
            .with_context(|| format!("building {tag} from the Dockerfile's stage {service} failed"))?;
            Ok(())
        })?;
    }
    step("image sizes", || check_sizes(&sh))?;
    step(
        "supply chain: each binary's embedded crates (cargo-auditable) and each image's SBOM",
        || crate::sbom::check_images(&sh, &SERVICES),
    )?;
    // Clean-up is a courtesy to the disk: when it fails, the images are still good.
    if let Err(err) = step("delete images older builds left behind", || {
        prune_old_builds(&sh)
    }) {
        eprintln!("warning: old images were not deleted: {err:#}");
    }
    Ok(())
}

/// Makes sure the Rust builder image the Dockerfiles start from is present (pulled, or made where no registry
/// answers), for tasks that build with compose rather than through [`images`].
pub(crate) fn ensure_builder_image(sh: &Shell) -> anyhow::Result<()> {
    let rust_image = check_dockerfiles()?;
    ensure_rust_image(sh, &rust_image)?;
    describe_builder(sh, &rust_image)
}

/// What marks an image of the Dockerfiles' builder stage: its working directory and its RUSTFLAGS.
const BUILDER_MARKS: (&str, &str) = ("/src", "RUSTFLAGS=-C target-feature=+crt-static");

/// At most this many rounds of clean-up: each round deletes one step of each old builder stage.
const PRUNE_ROUNDS: usize = 40;

/// Deletes the untagged images that earlier builds left: builder stages (about 1.5 GB each, one per change
/// of the manifests) other than the one that just built, and superseded `<service>:dev` images.
///
/// Old builder stages are deleted one step per round with `--no-prune`, from their last step up: a plain
/// `docker rmi` also deletes untagged parents, and those can be the current builder stage's layers, which
/// must stay so that the next build starts warm. A layer the current stage builds on has a child, so it is
/// never dangling and never a candidate.
fn prune_old_builds(sh: &Shell) -> anyhow::Result<()> {
    const DESCRIBE: &str = "{{.Id}}|{{.Config.WorkingDir}}|{{json .Config.Env}}|{{with .Config.Labels}}{{index . \"org.opencontainers.image.title\"}}{{end}}";
    // All cached: this only names the builder stage that the build above used.
    let current = cmd!(sh, "docker build -q --target builder .")
        .read()
        .context("cannot identify the current builder stage")?;
    let (workdir, rustflags) = BUILDER_MARKS;
    let rustflags = format!("\"{rustflags}\"");
    let mut deleted = 0;
    for _ in 0..PRUNE_ROUNDS {
        let dangling = cmd!(sh, "docker image ls -q --no-trunc --filter dangling=true").read()?;
        let dangling: Vec<&str> = dangling.lines().filter(|id| *id != current).collect();
        if dangling.is_empty() {
            break;
        }
        let described = cmd!(sh, "docker image inspect --format {DESCRIBE} {dangling...}")
            .ignore_status()
            .read()?;
        let mut deleted_this_round = 0;
        for line in described.lines() {
            let mut fields = line.splitn(4, '|');
            let (Some(id), Some(dir), Some(env), Some(title)) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let rmi = if dir == workdir && env.contains(&rustflags) {
                cmd!(sh, "docker rmi --no-prune {id}")
            } else if SERVICES.contains(&title) {
                // A runtime stage starts from scratch, so its untagged parents are never builder layers.
                cmd!(sh, "docker rmi {id}")
            } else {
                continue;
            };
            // An image that a container still uses cannot go; that is fine, a later run will try again.
            if rmi.quiet().ignore_stdout().ignore_stderr().run().is_ok() {
                deleted_this_round += 1;
            }
        }
        if deleted_this_round == 0 {
            break;
        }
        deleted += deleted_this_round;
    }
    println!("deleted {deleted} old image(s)");
    Ok(())
}

/// Makes sure the Docker daemon answers: installs Docker from Debian's packages if it is missing and starts
/// `dockerd` in the background if it is installed but not running.
pub(crate) fn ensure_docker(sh: &Shell) -> anyhow::Result<()> {
    if docker_answers(sh) {
        return Ok(());
    }
    if !has_program("docker") || !has_program("dockerd") {
        println!(
            "docker is not installed: installing docker.io and docker-compose from Debian's packages"
        );
        cmd!(sh, "apt-get update").run()?;
        cmd!(sh, "apt-get install -y docker.io docker-compose")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get install docker.io docker-compose failed")?;
        // The package's own start script may have started the daemon already.
        if docker_answers(sh) {
            return Ok(());
        }
    }
    let log_path = root().join("target").join("dockerd.log");
    fs::create_dir_all(root().join("target"))?;
    let log =
        fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    println!(
        "docker info failed: starting dockerd in the background (log: {})",
        log_path.display()
    );
    // A process group of its own, so that Ctrl-C on this task does not stop the daemon with it.
    let mut daemon = Command::new("dockerd");
    std::os::unix::process::CommandExt::process_group(&mut daemon, 0);
    daemon
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd failed")?;
    let deadline = Instant::now() + DOCKERD_START_TIMEOUT;
    while Instant::now() < deadline {
        if docker_answers(sh) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "dockerd did not answer `docker info` within {}s; see {}",
        DOCKERD_START_TIMEOUT.as_secs(),
        log_path.display()
    )
}

/// Whether `docker info` succeeds, that is whether the client reaches a daemon.
fn docker_answers(sh: &Shell) -> bool {
    cmd!(sh, "docker info")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}

/// Whether a program of this name is on the PATH.
fn has_program(name: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(name).is_file()))
        .unwrap_or(false)
}

/// The Dockerfiles that start from the Rust builder image: `Dockerfile` (the builder stage and one runtime stage per
/// service) and `Dockerfile.prometheus` (Debian's Prometheus for the observability compose file).
const DOCKERFILES: [&str; 2] = ["Dockerfile", "Dockerfile.prometheus"];

/// Checks that `Dockerfile` has a runtime stage for every service and that every Dockerfile's default `RUST_IMAGE`
/// is at the version that `rust-toolchain.toml` pins, and returns that image name.
fn check_dockerfiles() -> anyhow::Result<String> {
    let channel = toolchain_channel()?;
    let mut images = Vec::new();
    for name in DOCKERFILES {
        let path = root().join(name);
        let text =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let image = rust_image(&text).with_context(|| format!("in {}", path.display()))?;
        ensure!(
            image.starts_with(&format!("rust:{channel}-")),
            "{name}'s default RUST_IMAGE is {image}, but rust-toolchain.toml pins {channel}: \
             update `ARG RUST_IMAGE=rust:{channel}-...`"
        );
        if name == "Dockerfile" {
            for service in SERVICES {
                let stage = format!(" AS {service}");
                ensure!(
                    text.lines()
                        .any(|line| line.starts_with("FROM ") && line.trim_end().ends_with(&stage)),
                    "Dockerfile has no stage `FROM ... AS {service}`"
                );
            }
        }
        images.push(image);
    }
    ensure!(
        images.iter().all(|image| *image == images[0]),
        "the Dockerfiles start from different builder images ({}): keep one, so one image serves all",
        images.join(", ")
    );
    Ok(images.swap_remove(0))
}

/// The default of a Dockerfile's `ARG RUST_IMAGE=`.
fn rust_image(dockerfile: &str) -> anyhow::Result<String> {
    dockerfile
        .lines()
        .find_map(|line| line.trim().strip_prefix("ARG RUST_IMAGE="))
        .map(|image| image.trim().to_owned())
        .context("no `ARG RUST_IMAGE=` line")
}

/// The `channel` that `rust-toolchain.toml` pins, such as `1.95.0`.
fn toolchain_channel() -> anyhow::Result<String> {
    let path = root().join("rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml_string(&text, "toolchain", "channel")
        .with_context(|| format!("no [toolchain] channel in {}", path.display()))
}

/// The version of each of the workspace's packages, by name, as `cargo metadata` reads them (the
/// services take theirs from `[workspace.package]`).
fn package_versions(sh: &Shell) -> anyhow::Result<BTreeMap<String, String>> {
    let json = cmd!(sh, "cargo metadata --format-version 1 --no-deps --locked")
        .quiet()
        .read()
        .context("cargo metadata failed")?;
    package_versions_of(&json)
}

fn package_versions_of(json: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let metadata: serde_json::Value =
        serde_json::from_str(json).context("cargo metadata's output is not JSON")?;
    metadata["packages"]
        .as_array()
        .context("cargo metadata lists no packages")?
        .iter()
        .map(|package| {
            let field = |key: &str| {
                package[key]
                    .as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("a package in cargo metadata has no {key}"))
            };
            Ok((field("name")?, field("version")?))
        })
        .collect()
}

/// The value of a `key = "value"` line in a `[section]` of a simple TOML file (enough for
/// rust-toolchain.toml, which keeps a TOML parser out of xtask's dependencies).
fn toml_string(text: &str, section: &str, key: &str) -> Option<String> {
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_section = line == header;
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        if name.trim() == key {
            let value = value.trim();
            return value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .map(str::to_owned);
        }
    }
    None
}

/// The commit being built, or `unknown` outside a git checkout or before the first commit.
fn git_revision(sh: &Shell) -> String {
    cmd!(sh, "git rev-parse HEAD")
        .quiet()
        .ignore_stderr()
        .read()
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Prints the images' sizes and fails if any is over the budget.
fn check_sizes(sh: &Shell) -> anyhow::Result<()> {
    const LS_FORMAT: &str = "{{.Repository}}:{{.Tag}}\t{{.Size}}";
    const SIZE_FORMAT: &str = "{{.Size}}";
    let mut over = Vec::new();
    for service in SERVICES {
        let tag = format!("{service}:dev");
        let listed = cmd!(sh, "docker image ls {tag} --format {LS_FORMAT}").read()?;
        println!("{listed}");
        let bytes: u64 = cmd!(sh, "docker image inspect {tag} --format {SIZE_FORMAT}")
            .read()?
            .trim()
            .parse()
            .with_context(|| format!("cannot read the size of {tag}"))?;
        if bytes > IMAGE_BUDGET_BYTES {
            over.push(format!("{tag} is {bytes} bytes"));
        }
    }
    ensure!(
        over.is_empty(),
        "over the {} MB image budget: {}",
        IMAGE_BUDGET_BYTES / 1_000_000,
        over.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_a_version_in_cargo_metadata() {
        let sh = crate::util::shell().expect("a shell");
        let versions = package_versions(&sh).expect("cargo metadata");
        for service in SERVICES {
            let version = versions.get(service).expect("a workspace package");
            assert!(
                version.split('.').count() == 3,
                "{service} has version {version:?}"
            );
        }
    }

    #[test]
    fn package_versions_are_read_by_name() {
        let json =
            r#"{"packages": [{"name": "petra", "version": "1.2.3"}], "workspace_members": []}"#;
        let versions = package_versions_of(json).expect("valid metadata");
        assert_eq!(versions.get("petra").map(String::as_str), Some("1.2.3"));
        assert!(package_versions_of(r#"{"packages": [{"name": "x"}]}"#).is_err());
    }
}
