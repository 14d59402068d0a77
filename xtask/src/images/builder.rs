//! The Rust builder image the Dockerfiles start from: used when present, pulled when it can be,
//! made otherwise (a Debian root file system from `debootstrap` plus this machine's Rust
//! toolchain, imported under the official image's name).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};
use xshell::{Shell, cmd};

use super::{has_program, toolchain_channel};
use crate::util::{root, step};

/// How long `docker pull` may try before we make the builder image ourselves.
const PULL_TIMEOUT_SECS: &str = "120";

/// The environment of the made builder image, as in the official `rust` image (minus rustup, which it lacks).
/// `CARGO_HTTP_CAINFO` makes cargo trust what this machine trusts (where its traffic to crates.io passes a
/// TLS-inspecting proxy, for one); Debian's own bundle, which the runtime images copy, stays as Debian ships it.
const BUILDER_ENV: [&str; 3] = [
    "PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "CARGO_HOME=/usr/local/cargo",
    "CARGO_HTTP_CAINFO=/usr/local/etc/build-host-ca-certificates.crt",
];

/// This machine's CA bundle, which the made builder image's cargo uses (see `BUILDER_ENV`).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Makes sure the builder image exists locally: uses it if present, else pulls it, else makes it.
pub(super) fn ensure_rust_image(sh: &Shell, image: &str) -> anyhow::Result<()> {
    if image_exists(sh, image) {
        println!("{image} is present");
        return Ok(());
    }
    let pulled = cmd!(sh, "timeout {PULL_TIMEOUT_SECS} docker pull {image}")
        .ignore_stderr()
        .run()
        .is_ok();
    if pulled {
        return Ok(());
    }
    println!(
        "{image} cannot be pulled: making it from debootstrap and this machine's Rust toolchain"
    );
    make_rust_image(sh, image)
}

/// Prints what the builder image is, since its tag alone does not say: its local image ID, the Rust
/// toolchain, and the Debian packages whose bits reach the runtime images (glibc, linked statically; the CA
/// bundle Petra and Klaus carry). A digest pin is not possible here: the official image's digest cannot be
/// looked up without its registry, and a made image has no digest at all (`docker import` gives none), so
/// a `FROM ...@sha256:` would refuse it; the image ID differs per machine (debootstrap takes the suite's
/// packages of the day).
pub(super) fn describe_builder(sh: &Shell, image: &str) -> anyhow::Result<()> {
    const ID: &str = "{{.Id}}";
    let id = cmd!(sh, "docker image inspect --format {ID} {image}")
        .quiet()
        .read()?;
    let script = "rustc -V; dpkg-query -W -f '${Package} ${Version}\\n' libc6 gcc ca-certificates";
    let versions = cmd!(sh, "docker run --rm --network none {image} sh -c {script}")
        .quiet()
        .read()
        .context("cannot list the builder image's toolchain and packages")?;
    println!(
        "{image}: image {id}; {}",
        versions.lines().collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// Whether the local image store holds this image.
fn image_exists(sh: &Shell, image: &str) -> bool {
    cmd!(sh, "docker image inspect {image}")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}

/// Makes the builder image: a minimal Debian (of the suite the image tag names) with gcc and the C library
/// headers, plus this machine's Rust toolchain under /usr/local, imported as `image`.
fn make_rust_image(sh: &Shell, image: &str) -> anyhow::Result<()> {
    let channel = toolchain_channel()?;
    // The official tags end in the Debian suite, as in `rust:1.95.0-slim-bookworm`.
    let suite = image
        .rsplit(['-', ':'])
        .next()
        .filter(|suite| !suite.is_empty())
        .with_context(|| format!("cannot tell the Debian suite from the image name {image}"))?;
    let rustc_version = cmd!(sh, "rustc --version").read()?;
    ensure!(
        channel.chars().next().is_some_and(|c| !c.is_ascii_digit())
            || rustc_version.starts_with(&format!("rustc {channel} ")),
        "this machine's rustc is `{rustc_version}`, but rust-toolchain.toml pins {channel}"
    );
    let sysroot = PathBuf::from(cmd!(sh, "rustc --print sysroot").read()?);
    ensure!(
        sysroot.join("bin/cargo").is_file(),
        "no cargo in the Rust sysroot {}",
        sysroot.display()
    );
    let mirror = debian_mirror(suite)?;

    if !has_program("debootstrap") {
        cmd!(sh, "apt-get update").run()?;
        cmd!(sh, "apt-get install -y debootstrap")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .context("apt-get install debootstrap failed")?;
    }
    let rootfs = root().join("target").join("rust-image-rootfs");
    if rootfs.exists() {
        fs::remove_dir_all(&rootfs)
            .with_context(|| format!("removing the old {}", rootfs.display()))?;
    }
    fs::create_dir_all(&rootfs)?;
    let result = fill_and_import(sh, image, suite, &mirror, &sysroot, &rootfs, &channel);
    // The file system is in the image now (or the attempt failed); either way it is ~1 GB we no longer need.
    fs::remove_dir_all(&rootfs).with_context(|| format!("removing {}", rootfs.display()))?;
    result
}

/// Runs debootstrap into `rootfs`, adds the toolchain, and imports the result as `image`.
fn fill_and_import(
    sh: &Shell,
    image: &str,
    suite: &str,
    mirror: &str,
    sysroot: &Path,
    rootfs: &Path,
    channel: &str,
) -> anyhow::Result<()> {
    step(&format!("debootstrap {suite} from {mirror}"), || {
        let output = cmd!(
            sh,
            "debootstrap --variant=minbase --include=gcc,libc6-dev,ca-certificates {suite} {rootfs} {mirror}"
        )
        .quiet()
        .ignore_status()
        .output()?;
        if !output.status.success() {
            let log = String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            bail!("debootstrap failed ({})", output.status);
        }
        Ok(())
    })?;
    step("copy the Rust toolchain into /usr/local", || {
        // Package caches, documentation and translations are not needed to build; they are ~200 MB.
        for dir in [
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ] {
            let dir = rootfs.join(dir);
            if dir.exists() {
                fs::remove_dir_all(&dir)?;
                fs::create_dir_all(&dir)?;
            }
        }
        // bin/ and lib/ are the compilers, cargo and the standard library; share/ (docs, ~800 MB) is left out.
        let local = rootfs.join("usr/local");
        let bin = sysroot.join("bin");
        let lib = sysroot.join("lib");
        cmd!(sh, "cp -a {bin} {lib} {local}").run()?;
        fs::create_dir_all(local.join("cargo/bin"))?;
        fs::create_dir_all(local.join("etc"))?;
        fs::copy(
            HOST_CA_BUNDLE,
            local.join("etc/build-host-ca-certificates.crt"),
        )
        .with_context(|| format!("copying {HOST_CA_BUNDLE} into the builder image"))?;
        Ok(())
    })?;
    step(&format!("docker import {image}"), || {
        let mut changes = Vec::new();
        for env in BUILDER_ENV {
            changes.extend(["--change".to_owned(), format!("ENV {env}")]);
        }
        changes.extend(["--change".to_owned(), format!("ENV RUST_VERSION={channel}")]);
        changes.extend(["--change".to_owned(), "CMD [\"bash\"]".to_owned()]);
        let message = format!(
            "Debian {suite} (debootstrap minbase, gcc) with Rust {channel}, made by cargo xtask images"
        );
        // Device nodes under /dev are left out: the container runtime provides its own /dev.
        let mut tar = Command::from(cmd!(sh, "tar -C {rootfs} --exclude=./dev/* -c ."));
        let mut tar = tar
            .stdout(Stdio::piped())
            .spawn()
            .context("starting tar failed")?;
        let tar_out = tar.stdout.take().context("tar has no stdout")?;
        let import = Command::from(cmd!(
            sh,
            "docker import {changes...} --message {message} - {image}"
        ))
        .stdin(tar_out)
        .status()
        .context("starting docker import failed")?;
        let tar_status = tar.wait()?;
        ensure!(
            tar_status.success(),
            "tar of {} failed ({tar_status})",
            rootfs.display()
        );
        ensure!(import.success(), "docker import failed ({import})");
        Ok(())
    })?;
    step(&format!("smoke-test {image}"), || {
        let script = "cargo --version && rustc --version && cc --version | head -n1";
        cmd!(sh, "docker run --rm {image} sh -c {script}")
            .run()
            .context("the made builder image cannot run cargo, rustc and cc")?;
        Ok(())
    })
}

/// The Debian mirror this machine's apt uses for `suite`, read from its apt sources (so no mirror is written
/// into the repository). `DEBIAN_MIRROR` overrides it.
fn debian_mirror(suite: &str) -> anyhow::Result<String> {
    if let Ok(mirror) = std::env::var("DEBIAN_MIRROR") {
        return Ok(mirror);
    }
    let mut sources = Vec::new();
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        more.sort();
        files.extend(more);
    }
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("sources") => sources.extend(deb822_sources(&text)),
            _ if file.extension().is_none_or(|e| e == "list") => {
                sources.extend(one_line_sources(&text))
            }
            _ => {}
        }
    }
    // Prefer an entry for the suite itself; else any Debian archive that is not the security one.
    sources
        .iter()
        .find(|(_, suites)| suites.iter().any(|s| s == suite))
        .or_else(|| sources.iter().find(|(uri, _)| !uri.contains("security")))
        .map(|(uri, _)| uri.trim_end_matches('/').to_owned())
        .with_context(|| {
            format!("no Debian mirror for {suite} in /etc/apt/sources.list*; set DEBIAN_MIRROR")
        })
}

/// `(URI, suites)` of each `Types: deb` stanza of a deb822 `.sources` file.
fn deb822_sources(text: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .filter(|line| !line.starts_with('#'))
                .find_map(|line| {
                    line.strip_prefix(name)
                        .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                })
                .unwrap_or_default()
        };
        if !field("Types:").iter().any(|t| t == "deb")
            || field("Enabled:").iter().any(|v| v == "no")
        {
            continue;
        }
        let suites = field("Suites:");
        for uri in field("URIs:") {
            found.push((uri, suites.clone()));
        }
    }
    found
}

/// `(URI, [suite])` of each `deb` line of a one-line-style `sources.list`.
fn one_line_sources(text: &str) -> Vec<(String, Vec<String>)> {
    let mut found = Vec::new();
    for line in text.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        // Skip options such as `[arch=amd64 signed-by=...]`.
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']').map(|(_, r)| r).unwrap_or(""),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            found.push((uri.to_owned(), vec![suite.to_owned()]));
        }
    }
    found
}
