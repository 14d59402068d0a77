//! No key in any layer of the images `cargo xtask images` builds (petra:dev, klaus:dev, slowlink:dev,
//! tracesink:dev), and a self-test that proves the layer scan finds a key planted in a
//! throwaway image.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use xshell::{Shell, cmd};

use super::keys::{KEY_FILE_SUFFIXES, has_private_key_armor};

/// The images whose layers must hold no key: every one `cargo xtask images` builds.
fn images() -> Vec<String> {
    crate::images::SERVICES
        .iter()
        .map(|service| format!("{service}:dev"))
        .collect()
}

/// The throwaway image that proves the layer check finds a planted key.
const SELFTEST_IMAGE: &str = "petra-klaus-audit-selftest:throwaway";

/// Fails if any of [`images`] is missing or holds a key in any layer.
pub(super) fn image_keys(sh: &Shell, work: &Path) -> anyhow::Result<()> {
    let images = images();
    let images: Vec<&str> = images.iter().map(String::as_str).collect();
    let missing: Vec<&str> = images
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
    let (layers, found) = scan_images(sh, &images, &work.join("images"))?;
    if !found.is_empty() {
        bail!(
            "{} key(s) in the image layers:\n    {}\nKeys reach a container at run time from a \
             volume or Secret, never from the image.",
            found.len(),
            found.join("\n    ")
        );
    }
    println!("{}: {layers} layers checked, no key", images.join(", "));
    Ok(())
}

/// Builds a throwaway image holding a fake key, checks that the layer scan reports it, and
/// removes the image again.
pub(super) fn layer_selftest(sh: &Shell, work: &Path) -> anyhow::Result<()> {
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
    let saved_list = saved_images(&manifest)?;
    if saved_list.len() != images.len() || saved_list.iter().any(|i| i.layers.is_empty()) {
        bail!(
            "manifest.json of `docker save` lists {} images, expected {} with layers ({manifest})",
            saved_list.len(),
            images.len()
        );
    }
    let mut found = Vec::new();
    let mut count = 0;
    for (index, saved_image) in saved_list.iter().enumerate() {
        let image = saved_image
            .tags
            .first()
            .map_or_else(|| format!("image {index}"), Clone::clone);
        for layer in &saved_image.layers {
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

/// One image of the `manifest.json` that `docker save` writes: its tags and its layer archives.
#[derive(Debug, PartialEq)]
struct SavedImage {
    tags: Vec<String>,
    layers: Vec<String>,
}

/// The images `docker save` lists in its `manifest.json`, in order.
fn saved_images(manifest: &str) -> anyhow::Result<Vec<SavedImage>> {
    let json: Value =
        serde_json::from_str(manifest).context("manifest.json of `docker save` is not JSON")?;
    let images = json
        .as_array()
        .context("manifest.json of `docker save` is not a list")?;
    let strings = |image: &Value, key: &str| -> Vec<String> {
        image[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|item| item.as_str().map(str::to_owned))
            .collect()
    };
    Ok(images
        .iter()
        .map(|image| SavedImage {
            tags: strings(image, "RepoTags"),
            layers: strings(image, "Layers"),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_of_docker_save_gives_tags_and_layers_per_image() {
        let manifest = r#"[{"Config":"blobs/sha256/c1","RepoTags":["petra:dev"],
            "Layers":["blobs/sha256/a","blobs/sha256/b"]},
            {"Config":"blobs/sha256/c2","RepoTags":null,"Layers":["blobs/sha256/d"]}]"#;
        let images = saved_images(manifest).expect("a valid manifest parses");
        assert_eq!(
            images,
            [
                SavedImage {
                    tags: vec!["petra:dev".to_owned()],
                    layers: vec!["blobs/sha256/a".to_owned(), "blobs/sha256/b".to_owned()],
                },
                SavedImage {
                    tags: vec![],
                    layers: vec!["blobs/sha256/d".to_owned()],
                },
            ]
        );
        assert!(saved_images("{\"Layers\": []}").is_err());
    }
}
