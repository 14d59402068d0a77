//! `cargo xtask audit`: supply-chain, configuration and secret checks.
//!
//! 1. cargo-deny (`deny.toml`): licences, banned crates (OpenSSL, native-tls), duplicate versions,
//!    sources, for the workspace and for `fuzz/`. Advisories only where a local copy of the
//!    advisory database exists: RustSec publishes it only as a git repository (no crate or PyPI
//!    package carries it), on a host this network cannot reach. Without it the task says so in a
//!    banner, in CI's annotations and in its last line ("advisories NOT CHECKED"), never "all checks
//!    passed"; `XTASK_REQUIRE_ADVISORIES=1` turns the skip into a failure.
//! 2. hadolint (`.hadolint.yaml`) on every `Dockerfile*`.
//! 3. checkov (`.checkov.yaml`) on the rendered Kubernetes manifests (every overlay, alone and
//!    with the components), the Dockerfiles and the compose files. checkov has no compose
//!    framework, so the compose files get its secrets scan.
//! 4. No private key in the repository (tracked and untracked, not ignored files) and none in any
//!    layer of the images petra:dev, klaus:dev and slowlink:dev (built by `cargo xtask images`). The layer
//!    check proves itself on each run against a throwaway image that holds a fake key.
//! 5. testssl.sh against a Petra on loopback (`testssl.rs`): TLS 1.3 only, no finding above LOW.
//!
//! cargo-deny is installed into `target/tools` (or `$XTASK_TOOLS_ROOT`), hadolint and checkov
//! into the venv `target/audit-venv` (pinned with hashes in `xtask/audit/requirements.txt`); both
//! are kept between runs.
//! Every check runs even when an earlier one fails; the task fails if any did.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

use crate::util::{pip_install_hashed, root, shell, step};

/// The venv with hadolint and checkov; kept between runs.
const VENV: &str = "target/audit-venv";

/// Scratch space: rendered manifests, saved images.
const WORK: &str = "target/audit";

/// The images whose layers must hold no key.
const IMAGES: &[&str] = &["petra:dev", "klaus:dev", "slowlink:dev"];

/// The throwaway image that proves the layer check finds a planted key.
const SELFTEST_IMAGE: &str = "petra-klaus-audit-selftest:throwaway";

/// Components that replace an overlay's `certs` component instead of adding to the list.
const CERT_COMPONENTS: &[&str] = &["cert-manager"];
/// Entry points (Ingress, Gateway API); rendered alone and with each provider.
const ENTRY_COMPONENTS: &[&str] = &["ingress", "gateway-api"];
/// Provider components; last in the list, at most one.
const PROVIDER_COMPONENTS: &[&str] = &["aws", "azure", "gke"];
/// Components that add objects of their own (monitoring); rendered with each overlay.
const ADDON_COMPONENTS: &[&str] = &["prometheus-operator"];

/// File names that hold keys or key stores, whatever their content.
const KEY_FILE_SUFFIXES: &[&str] = &[
    ".key",
    ".p12",
    ".pfx",
    ".jks",
    ".keystore",
    "id_rsa",
    "id_ecdsa",
    "id_ed25519",
    "id_dsa",
];

/// Runs every audit check and fails if any failed.
pub(crate) fn audit(args: &[String]) -> anyhow::Result<()> {
    if let Some(arg) = args.first() {
        bail!("cargo xtask audit takes no arguments (got '{arg}')");
    }
    let sh = shell()?;
    let work = root().join(WORK);
    sh.create_dir(&work)?;
    let mut failed: Vec<String> = Vec::new();
    // Checks that did not run, each with the reason: they keep the summary from saying "all passed".
    let mut notes: Vec<String> = Vec::new();
    let mut record = |name: &str, result: anyhow::Result<()>| {
        if let Err(err) = result {
            failed.push(format!("{name}: {err:#}"));
        }
    };

    record(
        "cargo-deny",
        step(
            "cargo-deny (licenses, bans, sources; advisories if a local db exists)",
            || cargo_deny(&sh, &mut notes),
        ),
    );
    match step("python venv (hadolint, checkov)", || ensure_venv(&sh)) {
        Ok(bin) => {
            record(
                "hadolint",
                step("hadolint Dockerfile*", || hadolint(&sh, &bin)),
            );
            record(
                "checkov",
                step(
                    "checkov: rendered k8s manifests, Dockerfiles, compose files",
                    || checkov(&sh, &bin, &work),
                ),
            );
        }
        Err(err) => record("python venv", Err(err)),
    }
    record(
        "testssl.sh",
        step(
            "testssl.sh against Petra (TLS 1.3 only, nothing above LOW)",
            || crate::testssl::testssl(&sh, &work),
        ),
    );
    record(
        "repository keys",
        step("no private key in the repository", || repo_keys(&sh)),
    );
    record(
        "layer check self-test",
        step("layer check finds a planted key (throwaway image)", || {
            layer_selftest(&sh, &work)
        }),
    );
    record(
        "image keys",
        step(
            "no key in any layer of petra:dev, klaus:dev and slowlink:dev",
            || image_keys(&sh, &work),
        ),
    );

    for note in &notes {
        println!("NOTE: {note}");
    }
    if !failed.is_empty() {
        bail!(
            "{} audit check(s) failed:\n  {}",
            failed.len(),
            failed.join("\n  ")
        );
    }
    println!("{}", summary(&notes));
    Ok(())
}

/// The audit's last line when nothing failed: "all checks passed" only when nothing was skipped.
fn summary(skipped: &[String]) -> String {
    if skipped.is_empty() {
        return "audit: all checks passed".to_owned();
    }
    let what: Vec<&str> = skipped
        .iter()
        .map(|note| note.split(':').next().unwrap_or(note))
        .collect();
    format!(
        "audit: passed, but {} check(s) NOT RUN: {} (see the NOTE lines above)",
        skipped.len(),
        what.join("; ")
    )
}

// -------------------------------------------------------------------------------------------------
// cargo-deny

/// Runs cargo-deny on the workspace and on `fuzz/`; adds a note when advisories were not checked.
fn cargo_deny(sh: &Shell, notes: &mut Vec<String>) -> anyhow::Result<()> {
    let deny = crate::tools::cargo_deny(sh)?;
    let config = root().join("deny.toml");
    let db = advisory_db();
    let mut checks = vec!["licenses", "bans", "sources"];
    let mut fetch = Vec::new();
    match &db {
        Some(path) => {
            println!(
                "advisory database found at {}: checking advisories too (not refreshed)",
                path.display()
            );
            checks.push("advisories");
            fetch.push("--offline");
        }
        None => {
            let note = "ADVISORIES NOT CHECKED: cargo-deny's advisory database (RustSec) is a git \
                        repository on GitHub, which this network cannot reach (no crate or PyPI \
                        package carries it), and no local copy exists under \
                        $CARGO_HOME/advisory-dbs. Licences, bans and sources were checked; run \
                        `cargo deny check advisories` where GitHub is reachable, or scan the images' \
                        embedded dependency lists (/sbom.cdx.json, cargo-auditable) elsewhere."
                .to_owned();
            if std::env::var("XTASK_REQUIRE_ADVISORIES").is_ok_and(|v| v == "1") {
                bail!("{note} (XTASK_REQUIRE_ADVISORIES=1 makes this a failure)");
            }
            print!("{}", banner(&note));
            notes.push(note);
        }
    }
    // The libFuzzer licence exception applies to fuzz/ only; the workspace need not meet it.
    let runs: [(&str, &[&str]); 2] = [
        (
            "Cargo.toml",
            &["--allow", "license-exception-not-encountered"],
        ),
        ("fuzz/Cargo.toml", &[]),
    ];
    for (manifest, allow) in runs {
        let (fetch, checks) = (&fetch, &checks);
        println!("cargo deny: {manifest}");
        cmd!(
            sh,
            "{deny} deny --locked {fetch...} --manifest-path {manifest} --config {config} check {checks...} {allow...}"
        )
        .run()
        .with_context(|| format!("cargo deny check failed for {manifest}"))?;
    }
    Ok(())
}

/// A skipped check as it must show in a log that nobody reads closely: a framed block, and under CI
/// (`CI` set) a warning annotation, which GitHub Actions and GitLab show on the run's page.
fn banner(note: &str) -> String {
    let rule = "!".repeat(100);
    let mut out = format!("{rule}\n");
    let mut line = String::from("!!");
    for word in note.split_whitespace() {
        if line.len() + word.len() + 1 > 96 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("!!");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out.push_str(&rule);
    out.push('\n');
    if std::env::var_os("CI").is_some() {
        out.push_str(&format!("::warning title=advisories not checked::{note}\n"));
    }
    out
}

/// The local advisory database cargo-deny would use, if one was ever fetched on this machine.
fn advisory_db() -> Option<PathBuf> {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    let dbs = cargo_home.join("advisory-dbs");
    std::fs::read_dir(&dbs)
        .ok()?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.join("crates").is_dir())
}

// -------------------------------------------------------------------------------------------------
// hadolint and checkov

/// Creates the venv on first use and whenever the requirements change; returns its `bin/`.
fn ensure_venv(sh: &Shell) -> anyhow::Result<PathBuf> {
    let venv = root().join(VENV);
    let bin = venv.join("bin");
    let python = bin.join("python");
    let requirements = root().join("xtask").join("audit").join("requirements.txt");
    let wanted = sh.read_file(&requirements)?;
    // A copy of the requirements it was built from marks a finished, current venv.
    let stamp = venv.join("requirements.installed");
    if python.exists() && sh.read_file(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        println!("reusing {}", venv.display());
        return Ok(bin);
    }
    if venv.exists() {
        sh.remove_path(&venv)?;
    }
    cmd!(sh, "python3 -m venv {venv}")
        .run()
        .context("python3 -m venv failed (is python3-venv installed?)")?;
    pip_install_hashed(sh, &python, &requirements)?;
    sh.write_file(&stamp, wanted)?;
    Ok(bin)
}

/// The files in the workspace root whose name starts with `prefix` and ends with one of `suffixes`.
fn root_files(sh: &Shell, prefix: &str, suffixes: &[&str]) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = sh
        .read_dir(root())?
        .into_iter()
        .filter(|path| path.is_file())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| {
                    name.starts_with(prefix)
                        && (suffixes.is_empty() || suffixes.iter().any(|s| name.ends_with(s)))
                })
        })
        .collect();
    files.sort();
    Ok(files)
}

fn hadolint(sh: &Shell, bin: &Path) -> anyhow::Result<()> {
    let dockerfiles = root_files(sh, "Dockerfile", &[])?;
    if dockerfiles.is_empty() {
        bail!("no Dockerfile* in the workspace root");
    }
    let hadolint = bin.join("hadolint");
    let version = cmd!(sh, "{hadolint} --version").quiet().read()?;
    println!("{version}: {}", names(&dockerfiles));
    cmd!(sh, "{hadolint} --config .hadolint.yaml {dockerfiles...}")
        .run()
        .context(
            "hadolint reported findings (fix them, or ignore the rule in .hadolint.yaml with a \
             reason)",
        )?;
    Ok(())
}

fn checkov(sh: &Shell, bin: &Path, work: &Path) -> anyhow::Result<()> {
    let rendered = render_k8s(sh, work)?;
    let mut files = root_files(sh, "Dockerfile", &[])?;
    files.extend(root_files(sh, "docker-compose", &[".yml", ".yaml"])?);
    let file_args: Vec<String> = files
        .iter()
        .flat_map(|file| ["--file".to_owned(), file.display().to_string()])
        .collect();
    let checkov = bin.join("checkov");
    println!("checkov on {} and {}", rendered.display(), names(&files));
    cmd!(
        sh,
        "{checkov} --config-file .checkov.yaml --directory {rendered} {file_args...}"
    )
    // No network here besides package registries: no platform, no guideline download.
    .env("BC_SKIP_MAPPING", "TRUE")
    .env("CHECKOV_SKIP_VERSION_CHECK", "TRUE")
    .run()
    .context(
        "checkov reported findings (fix them, or skip the check in .checkov.yaml with a reason)",
    )?;
    Ok(())
}

/// Renders every overlay alone, with each component, and each entry point with each provider,
/// from a scratch copy of `k8s/` with placeholder certificate files (no key is needed to check the
/// manifests). Writes each document once, into the first variant that produced it; returns the
/// folder.
fn render_k8s(sh: &Shell, work: &Path) -> anyhow::Result<PathBuf> {
    let scratch = work.join("k8s");
    let out = work.join("k8s-rendered");
    for dir in [&scratch, &out] {
        if sh.path_exists(dir) {
            sh.remove_path(dir)?;
        }
    }
    sh.create_dir(&out)?;
    let k8s = root().join("k8s");
    cmd!(sh, "cp -r {k8s} {scratch}").quiet().run()?;
    // The certs components' secretGenerators read these files; empty stand-ins render the same.
    for overlay in sh.read_dir(scratch.join("overlays"))? {
        let certs = overlay.join("certs");
        if certs.join("kustomization.yaml").is_file() {
            for service in ["petra", "klaus"] {
                for file in ["tls.crt", "tls.key", "ca.crt"] {
                    sh.write_file(certs.join(service).join(file), "placeholder\n")?;
                }
            }
        }
    }
    let components = dir_names(sh, &scratch.join("components"))?;
    for component in &components {
        let known = [
            CERT_COMPONENTS,
            ENTRY_COMPONENTS,
            PROVIDER_COMPONENTS,
            ADDON_COMPONENTS,
        ]
        .iter()
        .any(|set| set.contains(&component.as_str()));
        if !known {
            bail!(
                "k8s/components/{component} is new: give it a place in xtask/src/audit.rs \
                 (CERT_, ENTRY_, PROVIDER_ or ADDON_COMPONENTS)"
            );
        }
    }
    let mut variants: Vec<Vec<&str>> = vec![vec![]];
    variants.extend(components.iter().map(|c| vec![c.as_str()]));
    for entry in ENTRY_COMPONENTS
        .iter()
        .filter(|c| components.iter().any(|k| k == *c))
    {
        for provider in PROVIDER_COMPONENTS
            .iter()
            .filter(|c| components.iter().any(|k| k == *c))
        {
            variants.push(vec![entry, provider]);
        }
    }
    let mut seen = std::collections::HashSet::new();
    let (mut renders, mut documents) = (0, 0);
    for overlay in dir_names(sh, &scratch.join("overlays"))? {
        let kustomization = sh.read_file(
            scratch
                .join("overlays")
                .join(&overlay)
                .join("kustomization.yaml"),
        )?;
        if kustomization
            .lines()
            .any(|line| line.trim() == "kind: Component")
        {
            continue;
        }
        for comps in &variants {
            let name = std::iter::once(overlay.as_str())
                .chain(comps.iter().copied())
                .collect::<Vec<_>>()
                .join("+");
            let dir = scratch.join("overlays").join(&name);
            if !comps.is_empty() {
                cmd!(sh, "cp -r {scratch}/overlays/{overlay} {dir}")
                    .quiet()
                    .run()?;
                sh.write_file(
                    dir.join("kustomization.yaml"),
                    with_components(&kustomization, comps),
                )?;
            }
            let yaml = cmd!(sh, "kubectl kustomize {dir}")
                .quiet()
                .read()
                .with_context(|| format!("kubectl kustomize {name} failed"))?;
            renders += 1;
            let fresh: Vec<&str> = yaml
                .split("\n---\n")
                .filter(|doc| !doc.trim().is_empty() && seen.insert(doc.trim().to_owned()))
                .collect();
            documents += fresh.len();
            if !fresh.is_empty() {
                sh.write_file(
                    out.join(format!("{name}.yaml")),
                    fresh.join("\n---\n") + "\n",
                )?;
            }
        }
    }
    println!(
        "rendered {renders} overlay variants into {documents} distinct documents in {}",
        out.display()
    );
    Ok(out)
}

/// The overlay's kustomization with `comps` switched in, as a user would edit it: a
/// certificate component replaces `certs`, the others go at the end of `components:`.
fn with_components(kustomization: &str, comps: &[&str]) -> String {
    let mut lines: Vec<String> = kustomization.lines().map(str::to_owned).collect();
    let start = lines
        .iter()
        .position(|line| line.trim_end() == "components:");
    let start = match start {
        Some(at) => at,
        None => {
            lines.push("components:".to_owned());
            lines.len() - 1
        }
    };
    // The list runs until the next line that starts at column 0 (comments excepted).
    let end = lines[start + 1..]
        .iter()
        .position(|line| !line.is_empty() && !line.starts_with([' ', '#']))
        .map_or(lines.len(), |at| start + 1 + at);
    let mut insert_at = lines[start + 1..end]
        .iter()
        .rposition(|line| line.trim_start().starts_with("- "))
        .map_or(start + 1, |at| start + 2 + at);
    for comp in comps {
        let item = format!("  - ../../components/{comp}");
        let certs = lines[start + 1..insert_at]
            .iter()
            .position(|line| line.trim() == "- certs");
        match certs {
            Some(at) if CERT_COMPONENTS.contains(comp) => lines[start + 1 + at] = item,
            _ => {
                lines.insert(insert_at, item);
                insert_at += 1;
            }
        }
    }
    lines.join("\n") + "\n"
}

/// The names of the sub-folders of `dir`, sorted.
fn dir_names(sh: &Shell, dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = sh
        .read_dir(dir)?
        .into_iter()
        .filter(|path| path.is_dir())
        .filter_map(|path| path.file_name().and_then(|n| n.to_str()).map(str::to_owned))
        .collect();
    names.sort();
    Ok(names)
}

fn names(files: &[PathBuf]) -> String {
    files
        .iter()
        .filter_map(|file| file.file_name().and_then(|n| n.to_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

// -------------------------------------------------------------------------------------------------
// Keys in the repository and in the images

/// A PEM private key of any kind (PKCS#8, RSA, EC, encrypted, OpenSSH, PGP), as `git grep -E`.
/// Written so that this line does not match itself.
const KEY_ARMOR_RE: &str = "-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----";

/// An AWS access key id, the one cloud credential with a fixed, recognisable shape.
const AWS_KEY_ID_RE: &str = "(^|[^A-Z0-9])AKIA[0-9A-Z]{16}([^A-Z0-9]|$)";

/// Fails if a file git would commit (tracked, or untracked and not ignored) holds a private key
/// or is named like a key file.
fn repo_keys(sh: &Shell) -> anyhow::Result<()> {
    let mut found = Vec::new();
    let listed = cmd!(sh, "git ls-files --cached --others --exclude-standard")
        .quiet()
        .read()
        .context("git ls-files failed")?;
    let files = listed.lines().count();
    for file in listed.lines() {
        if KEY_FILE_SUFFIXES
            .iter()
            .any(|suffix| file.ends_with(suffix))
        {
            found.push(format!("{file}: named like a key file"));
        }
    }
    for (what, pattern) in [
        ("private key", KEY_ARMOR_RE),
        ("AWS access key id", AWS_KEY_ID_RE),
    ] {
        let output = cmd!(sh, "git grep --untracked -I -n -E -e {pattern}")
            .quiet()
            .ignore_status()
            .output()?;
        match output.status.code() {
            Some(0) => {
                for line in String::from_utf8_lossy(&output.stdout).lines() {
                    let place = line.splitn(3, ':').take(2).collect::<Vec<_>>().join(":");
                    found.push(format!("{place}: {what}"));
                }
            }
            Some(1) => {}
            _ => bail!(
                "git grep failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        }
    }
    if !found.is_empty() {
        bail!(
            "{} key(s) or secret(s) in files git would commit:\n    {}\nRemove them (and rotate \
             them: they may be in the history already); certificates and keys belong in gitignored \
             folders (`cargo xtask certs --out DIR`).",
            found.len(),
            found.join("\n    ")
        );
    }
    println!("{files} files checked: no private key, no key file, no AWS access key id");
    Ok(())
}

/// Fails if any of [`IMAGES`] is missing or holds a key in any layer.
fn image_keys(sh: &Shell, work: &Path) -> anyhow::Result<()> {
    let missing: Vec<&str> = IMAGES
        .iter()
        .copied()
        .filter(|image| {
            cmd!(sh, "docker image inspect {image}")
                .quiet()
                .ignore_stdout()
                .ignore_stderr()
                .run()
                .is_err()
        })
        .collect();
    if !missing.is_empty() {
        bail!(
            "image(s) {} not found, so their layers cannot be checked: build them with \
             `cargo xtask images` first (this check never passes without them)",
            missing.join(", ")
        );
    }
    let (layers, found) = scan_images(sh, IMAGES, &work.join("images"))?;
    if !found.is_empty() {
        bail!(
            "{} key(s) in the image layers:\n    {}\nKeys reach a container at run time from a \
             volume or Secret, never from the image.",
            found.len(),
            found.join("\n    ")
        );
    }
    println!("{}: {layers} layers checked, no key", IMAGES.join(", "));
    Ok(())
}

/// Builds a throwaway image holding a fake key, checks that the layer scan reports it, and
/// removes the image again.
fn layer_selftest(sh: &Shell, work: &Path) -> anyhow::Result<()> {
    let dir = work.join("selftest");
    if sh.path_exists(&dir) {
        sh.remove_path(&dir)?;
    }
    sh.create_dir(&dir)?;
    // Not a key: the armor around the base64 of a sentence.
    let label = "PRIVATE KEY";
    let fake = format!(
        "-----BEGIN {label}-----\nbm90IGEga2V5OyBhIHRlc3Qgb2YgdGhlIGxheWVyIGNoZWNr\n-----END {label}-----\n"
    );
    sh.write_file(dir.join("fake-pem.txt"), &fake)?;
    sh.write_file(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY fake-pem.txt /etc/app/config.txt\nCOPY fake-pem.txt /certs/tls.key\n",
    )?;
    let built = cmd!(sh, "docker build --quiet --tag {SELFTEST_IMAGE} {dir}")
        .quiet()
        .ignore_status()
        .output()
        .context("could not run docker build")?;
    if !built.status.success() {
        bail!(
            "could not build the throwaway test image: {}",
            String::from_utf8_lossy(&built.stderr).trim()
        );
    }
    let scanned = scan_images(sh, &[SELFTEST_IMAGE], &dir.join("images"));
    let removed = cmd!(sh, "docker image rm --force {SELFTEST_IMAGE}")
        .quiet()
        .ignore_stdout()
        .run();
    let (_, found) = scanned?;
    removed.context("could not remove the throwaway test image")?;
    let by_content = found
        .iter()
        .any(|f| f.contains("/etc/app/config.txt") && f.contains("private key"));
    let by_name = found.iter().any(|f| f.contains("/certs/tls.key"));
    if !(by_content && by_name) {
        bail!(
            "the layer scan missed the planted key (by content: {by_content}, by name: {by_name}); \
             found: {found:?}"
        );
    }
    println!(
        "the planted key was found ({} findings); throwaway image removed",
        found.len()
    );
    Ok(())
}

/// `docker save`s `images`, unpacks every layer and returns the number of layers and one line
/// per key found (by file name or by content).
fn scan_images(sh: &Shell, images: &[&str], dir: &Path) -> anyhow::Result<(usize, Vec<String>)> {
    if sh.path_exists(dir) {
        sh.remove_path(dir)?;
    }
    let saved = sh.create_dir(dir.join("saved"))?;
    let archive = dir.join("images.tar");
    cmd!(sh, "docker save --output {archive} {images...}")
        .quiet()
        .run()
        .context("docker save failed")?;
    cmd!(sh, "tar -xf {archive} -C {saved}").quiet().run()?;
    sh.remove_path(&archive)?;
    let manifest = sh
        .read_file(saved.join("manifest.json"))
        .context("docker save wrote no manifest.json")?;
    let layer_lists = json_string_arrays(&manifest, "Layers");
    let tags = json_string_arrays(&manifest, "RepoTags");
    if layer_lists.len() != images.len() || layer_lists.iter().any(Vec::is_empty) {
        bail!(
            "manifest.json of `docker save` lists {} images with layers, expected {} ({manifest})",
            layer_lists.len(),
            images.len()
        );
    }
    let mut found = Vec::new();
    let mut count = 0;
    for (index, layers) in layer_lists.iter().enumerate() {
        let image = tags
            .get(index)
            .and_then(|t| t.first())
            .map_or_else(|| format!("image {index}"), Clone::clone);
        for layer in layers {
            count += 1;
            let unpacked = sh.create_dir(dir.join("layers").join(count.to_string()))?;
            let tar = saved.join(layer);
            cmd!(
                sh,
                "tar --no-same-owner --no-same-permissions -xf {tar} -C {unpacked}"
            )
            .quiet()
            .run()
            .with_context(|| format!("could not unpack layer {layer} of {image}"))?;
            for file in regular_files(&unpacked)? {
                let inside = file
                    .strip_prefix(&unpacked)
                    .unwrap_or(&file)
                    .display()
                    .to_string();
                let place = format!("{image}: layer {layer}: /{inside}");
                if KEY_FILE_SUFFIXES
                    .iter()
                    .any(|suffix| inside.ends_with(suffix))
                {
                    found.push(format!("{place}: named like a key file"));
                }
                let data = std::fs::read(&file).with_context(|| format!("cannot read {place}"))?;
                if has_private_key_armor(&data) {
                    found.push(format!("{place}: private key (PEM)"));
                }
            }
            sh.remove_path(&unpacked)?;
        }
    }
    Ok((count, found))
}

/// The regular files under `dir`, recursively; symlinks and special files are not followed.
fn regular_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)
            .with_context(|| format!("cannot list {}", current.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                pending.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    Ok(files)
}

/// Whether `data` holds PEM armor of a private key: `-----BEGIN `, a label of capitals, digits
/// and spaces that contains `PRIVATE KEY`, and `-----`.
fn has_private_key_armor(data: &[u8]) -> bool {
    const BEGIN: &[u8] = b"-----BEGIN ";
    let mut rest = data;
    while let Some(at) = rest.windows(BEGIN.len()).position(|w| w == BEGIN) {
        let after = &rest[at + BEGIN.len()..];
        let label_len = after
            .iter()
            .take(64)
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || **b == b' ')
            .count();
        let label = &after[..label_len];
        if after[label_len..].starts_with(b"-----")
            && label.windows(11).any(|w| w == b"PRIVATE KEY")
        {
            return true;
        }
        rest = after;
    }
    false
}

/// The string arrays stored under `"key": [...]` in compact JSON, in order of appearance.
/// Enough for the `manifest.json` that `docker save` writes, whose strings hold no quotes.
fn json_string_arrays(json: &str, key: &str) -> Vec<Vec<String>> {
    let needle = format!("\"{key}\":");
    let mut arrays = Vec::new();
    let mut rest = json;
    while let Some(at) = rest.find(&needle) {
        rest = rest[at + needle.len()..].trim_start();
        let Some(body) = rest.strip_prefix('[') else {
            continue;
        };
        let Some(end) = body.find(']') else {
            break;
        };
        arrays.push(
            body[..end]
                .split(',')
                .map(|item| item.trim().trim_matches('"').to_owned())
                .filter(|item| !item.is_empty())
                .collect(),
        );
        rest = &body[end..];
    }
    arrays
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_skipped_check_keeps_the_summary_from_saying_all_passed() {
        assert_eq!(summary(&[]), "audit: all checks passed");
        let skipped = vec!["ADVISORIES NOT CHECKED: no database".to_owned()];
        let line = summary(&skipped);
        assert!(!line.contains("all checks passed"), "{line}");
        assert!(line.contains("NOT RUN: ADVISORIES NOT CHECKED"), "{line}");
    }

    #[test]
    fn the_banner_frames_every_word_of_the_note() {
        let note = "ADVISORIES NOT CHECKED: ".to_owned() + &"word ".repeat(60);
        let text = banner(&note);
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("::")).collect();
        assert!(lines.len() > 4, "{text}");
        assert!(
            lines.iter().all(|l| l.starts_with("!!") && l.len() <= 100),
            "{text}"
        );
        // Every word once in the frame (under CI the note is also repeated as a `::warning` line).
        let framed: usize = lines.iter().map(|l| l.matches("word").count()).sum();
        assert_eq!(framed, 60, "{text}");
    }
}
