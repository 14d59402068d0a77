//! What the images tell a scanner: each binary's embedded dependency list and each image's SBOM, checked
//! against `Cargo.lock`.
//!
//! The builder stage builds with `cargo auditable`, which puts the binary's crates (name, version, source)
//! into a zlib-compressed JSON section `.dep-v0`, the one `cargo audit bin`, Trivy, Grype and Syft read; and
//! it runs `cargo cyclonedx`, whose CycloneDX document each image carries at [`SBOM_PATH`]. After a build this
//! copies both out of every image and fails unless the SBOM is CycloneDX for that service, and every crate
//! the binary embeds is in the SBOM at the version `Cargo.lock` pins (the key ones named in [`KEY_CRATES`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use xshell::{Shell, cmd};

use crate::util::root;

/// Where each image carries its SBOM.
pub(crate) const SBOM_PATH: &str = "/sbom.cdx.json";

/// Crates each binary must embed and its SBOM must list, at the version Cargo.lock pins: the ones an
/// advisory for these services would most likely name.
const KEY_CRATES: &[(&str, &[&str])] = &[
    ("petra", &["hyper", "rustls", "tokio", "h2"]),
    ("klaus", &["hyper", "rustls", "tokio", "h2"]),
    ("slowlink", &["tokio"]),
    ("tracesink", &["hyper", "tokio", "prost"]),
];

/// A crate by name and version.
type Crate = (String, String);

/// Copies the binary and the SBOM out of `<service>:dev` for each service and checks them (module docs).
pub(crate) fn check_images(sh: &Shell, services: &[&str]) -> anyhow::Result<()> {
    let lock = lock_versions(&sh.read_file(root().join("Cargo.lock"))?);
    let dir = root().join("target").join("images-sbom");
    if sh.path_exists(&dir) {
        sh.remove_path(&dir)?;
    }
    sh.create_dir(&dir)?;
    for service in services {
        let (binary, sbom) = copy_out(sh, service, &dir)?;
        let embedded =
            embedded_crates(sh, &binary).with_context(|| format!("{service}:dev: /{service}"))?;
        let text = sh.read_file(&sbom)?;
        let listed =
            sbom_crates(&text, service).with_context(|| format!("{service}:dev: {SBOM_PATH}"))?;
        let key = KEY_CRATES
            .iter()
            .find(|(name, _)| name == service)
            .map_or(&[][..], |(_, crates)| *crates);
        check_against_lock(service, &embedded, &listed, &lock, key)?;
        println!(
            "{service}:dev: /{service} embeds {} crates (.dep-v0), {SBOM_PATH} lists {} (CycloneDX), \
             all at Cargo.lock's versions; {}",
            embedded.len(),
            listed.len(),
            key.iter()
                .map(|name| format!("{name} {}", versions_of(&listed, name).join("/")))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Copies `/<service>` and the SBOM out of `<service>:dev` into `dir`, through a container that never runs.
fn copy_out(sh: &Shell, service: &str, dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let image = format!("{service}:dev");
    let container = format!("petra-klaus-sbom-check-{service}-{}", std::process::id());
    cmd!(sh, "docker create --name {container} {image}")
        .quiet()
        .ignore_stdout()
        .run()
        .with_context(|| {
            format!("docker create {image} failed (build it with `cargo xtask images`)")
        })?;
    let binary = dir.join(service);
    let sbom = dir.join(format!("{service}.cdx.json"));
    let copied = (|| {
        let from = format!("{container}:/{service}");
        cmd!(sh, "docker cp {from} {binary}").quiet().run()?;
        let from = format!("{container}:{SBOM_PATH}");
        cmd!(sh, "docker cp {from} {sbom}")
            .quiet()
            .run()
            .with_context(|| {
                format!("{image} has no {SBOM_PATH} (the Dockerfile's runtime stage copies it)")
            })?;
        anyhow::Ok(())
    })();
    let removed = cmd!(sh, "docker rm {container}")
        .quiet()
        .ignore_stdout()
        .run();
    copied?;
    removed.with_context(|| format!("could not remove the container {container}"))?;
    Ok((binary, sbom))
}

/// The crates `cargo auditable` embedded in `binary`: its `.dep-v0` section, inflated (Python's zlib, which
/// the k8s and audit tasks need anyway) and parsed.
fn embedded_crates(sh: &Shell, binary: &Path) -> anyhow::Result<BTreeSet<Crate>> {
    let section = binary.with_extension("dep-v0");
    let _ = std::fs::remove_file(&section);
    let copy = binary.with_extension("objcopy");
    let dump = format!(".dep-v0={}", section.display());
    let dumped = cmd!(sh, "objcopy --dump-section {dump} {binary} {copy}")
        .quiet()
        .ignore_stderr()
        .run();
    let _ = std::fs::remove_file(&copy);
    // objcopy exits 0 when the section is missing (it only warns), so the file it writes is the answer.
    if dumped.is_err() || !section.is_file() {
        bail!(
            "the binary has no .dep-v0 section: it was not built with `cargo auditable build` (the \
             Dockerfiles' builder stage), so scanners cannot see its crates"
        );
    }
    let inflate = "import sys, zlib; sys.stdout.write(zlib.decompress(open(sys.argv[1], 'rb').read()).decode())";
    let json = cmd!(sh, "python3 -c {inflate} {section}")
        .quiet()
        .read()
        .context("the .dep-v0 section does not inflate (zlib)")?;
    audit_data_crates(&json)
}

/// The crates of cargo-auditable's JSON (`{"packages": [{"name", "version", "source", ...}]}`).
fn audit_data_crates(json: &str) -> anyhow::Result<BTreeSet<Crate>> {
    let data: Value = serde_json::from_str(json).context("the .dep-v0 section is not JSON")?;
    let packages = data["packages"]
        .as_array()
        .context("the .dep-v0 section has no `packages` list")?;
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().context("a package without a name")?;
            let version = p["version"]
                .as_str()
                .context("a package without a version")?;
            Ok((name.to_owned(), version.to_owned()))
        })
        .collect()
}

/// The crates a CycloneDX SBOM lists (the described component and every component, nested ones too),
/// after checking that it is CycloneDX JSON describing `service`.
fn sbom_crates(json: &str, service: &str) -> anyhow::Result<BTreeSet<Crate>> {
    let bom: Value = serde_json::from_str(json).context("not JSON")?;
    ensure!(
        bom["bomFormat"] == "CycloneDX",
        "not a CycloneDX document (bomFormat is {})",
        bom["bomFormat"]
    );
    let spec = bom["specVersion"]
        .as_str()
        .context("a CycloneDX document without specVersion")?;
    ensure!(
        spec.starts_with("1."),
        "CycloneDX specVersion {spec}: expected 1.x"
    );
    let described = &bom["metadata"]["component"];
    ensure!(
        described["name"] == service,
        "the SBOM describes {}, not {service}",
        described["name"]
    );
    let mut crates = BTreeSet::new();
    let mut pending = vec![described];
    pending.extend(bom["components"].as_array().into_iter().flatten());
    while let Some(component) = pending.pop() {
        if let (Some(name), Some(version)) =
            (component["name"].as_str(), component["version"].as_str())
        {
            // Binary targets of the described crate are sub-components without a purl of their own.
            if component["purl"].is_string() || std::ptr::eq(component, described) {
                crates.insert((name.to_owned(), version.to_owned()));
            }
        }
        pending.extend(component["components"].as_array().into_iter().flatten());
    }
    Ok(crates)
}

/// `name -> versions` of every package in a `Cargo.lock`.
fn lock_versions(lock: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut versions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut name = None;
    for line in lock.lines() {
        if line == "[[package]]" {
            name = None;
        } else if let Some(value) = line.strip_prefix("name = ") {
            name = Some(value.trim_matches('"').to_owned());
        } else if let (Some(value), Some(current)) = (line.strip_prefix("version = "), name.take())
        {
            versions
                .entry(current)
                .or_default()
                .insert(value.trim_matches('"').to_owned());
        }
    }
    versions
}

fn versions_of(crates: &BTreeSet<Crate>, name: &str) -> Vec<String> {
    crates
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}

/// Fails unless the SBOM lists every crate the binary embeds, every crate of both is in `Cargo.lock` at
/// that version, and the key crates are there.
fn check_against_lock(
    service: &str,
    embedded: &BTreeSet<Crate>,
    listed: &BTreeSet<Crate>,
    lock: &BTreeMap<String, BTreeSet<String>>,
    key: &[&str],
) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (name, version) in embedded.difference(listed) {
        problems.push(format!(
            "{name} {version} is in the binary but not in the SBOM"
        ));
    }
    for (name, version) in embedded.union(listed) {
        if !lock.get(name).is_some_and(|v| v.contains(version)) {
            problems.push(format!(
                "{name} {version} is not in Cargo.lock (a stale build?)"
            ));
        }
    }
    for name in key {
        if versions_of(embedded, name).is_empty() || versions_of(listed, name).is_empty() {
            problems.push(format!(
                "{name} is missing from the binary's list or the SBOM"
            ));
        }
    }
    if !problems.is_empty() {
        bail!(
            "{service}:dev: the embedded dependency list and the SBOM disagree with Cargo.lock:\n    {}",
            problems.join("\n    ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCK: &str = "version = 4\n\n[[package]]\nname = \"hyper\"\nversion = \"1.6.0\"\n\
        source = \"registry+x\"\n\n[[package]]\nname = \"petra\"\nversion = \"0.1.0\"\n\n\
        [[package]]\nname = \"rustls\"\nversion = \"0.23.1\"\n";

    fn bom(service: &str, components: &str) -> String {
        format!(
            r#"{{"bomFormat": "CycloneDX", "specVersion": "1.5",
               "metadata": {{"component": {{"name": "{service}", "version": "0.1.0",
                   "components": [{{"type": "application", "name": "{service}", "version": "0.1.0"}}]}}}},
               "components": [{components}]}}"#
        )
    }

    const HYPER: &str = r#"{"type": "library", "name": "hyper", "version": "1.6.0", "purl": "pkg:cargo/hyper@1.6.0"}"#;
    const RUSTLS: &str = r#"{"type": "library", "name": "rustls", "version": "0.23.1", "purl": "pkg:cargo/rustls@0.23.1"}"#;

    fn set(items: &[(&str, &str)]) -> BTreeSet<Crate> {
        items
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_matching_binary_and_sbom_pass() {
        let listed = sbom_crates(&bom("petra", &format!("{HYPER}, {RUSTLS}")), "petra")
            .expect("must succeed");
        assert_eq!(
            listed,
            set(&[("hyper", "1.6.0"), ("petra", "0.1.0"), ("rustls", "0.23.1")])
        );
        let embedded = audit_data_crates(
            r#"{"packages": [{"name": "petra", "version": "0.1.0", "source": "local"},
                {"name": "hyper", "version": "1.6.0", "source": "crates.io"}]}"#,
        )
        .expect("must succeed");
        check_against_lock(
            "petra",
            &embedded,
            &listed,
            &lock_versions(LOCK),
            &["hyper"],
        )
        .expect("must succeed");
    }

    /// A binary built without cargo-auditable (this test binary) has no list to read: a clear error,
    /// not a zlib failure.
    #[test]
    fn a_binary_built_without_cargo_auditable_is_refused() {
        let sh = Shell::new().expect("a shell");
        let dir = std::env::temp_dir().join(format!("sbom-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let binary = dir.join("plain");
        let me = std::env::current_exe().expect("the test binary");
        std::fs::copy(me, &binary).expect("a copy of the test binary");
        let err = embedded_crates(&sh, &binary).expect_err("must fail");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(err.to_string().contains("no .dep-v0 section"), "{err:#}");
    }

    #[test]
    fn an_sbom_that_is_not_cyclonedx_or_describes_another_service_fails() {
        let spdx = r#"{"spdxVersion": "SPDX-2.3", "packages": []}"#;
        let err = sbom_crates(spdx, "petra").expect_err("must fail");
        assert!(
            err.to_string().contains("not a CycloneDX document"),
            "{err}"
        );
        let err = sbom_crates(&bom("klaus", HYPER), "petra").expect_err("must fail");
        assert!(err.to_string().contains("describes \"klaus\""), "{err}");
    }

    #[test]
    fn a_crate_missing_from_the_sbom_or_at_another_version_fails() {
        let lock = lock_versions(LOCK);
        let embedded = set(&[("petra", "0.1.0"), ("hyper", "1.6.0"), ("rustls", "0.23.1")]);
        let listed = sbom_crates(&bom("petra", HYPER), "petra").expect("must succeed");
        let err = check_against_lock("petra", &embedded, &listed, &lock, &["hyper"])
            .expect_err("must fail");
        assert!(
            err.to_string()
                .contains("rustls 0.23.1 is in the binary but not in the SBOM"),
            "{err}"
        );
        let stale = set(&[("petra", "0.1.0"), ("hyper", "1.5.0")]);
        let err = check_against_lock("petra", &stale, &stale, &lock, &[]).expect_err("must fail");
        assert!(
            err.to_string().contains("hyper 1.5.0 is not in Cargo.lock"),
            "{err}"
        );
        let err = check_against_lock("petra", &set(&[]), &set(&[]), &lock, &["rustls"])
            .expect_err("must fail");
        assert!(err.to_string().contains("rustls is missing"), "{err}");
    }
}
