//! The README's way to make an overlay's certificates without Rust: `docker run` of the Petra
//! image's `certs` subcommand into a host folder, as the host's user. Checks that it writes every
//! file the overlays' `certs` component turns into Secrets, owned by that user.

use std::fs;
use std::os::unix::fs::MetadataExt;

use anyhow::{Context, ensure};
use xshell::{Shell, cmd};

use crate::util::root;

/// What `k8s/overlays/*/certs/kustomization.yaml` reads, relative to the certificates folder.
const COMPONENT_FILES: [&str; 6] = [
    "petra/tls.crt",
    "petra/tls.key",
    "petra/ca.crt",
    "klaus/tls.crt",
    "klaus/tls.key",
    "klaus/ca.crt",
];

pub(super) fn run(sh: &Shell) -> anyhow::Result<()> {
    let out = root().join("target").join("e2e-certs");
    if out.exists() {
        fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
    }
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let owner = fs::metadata(&out)?;
    let user = format!("{}:{}", owner.uid(), owner.gid());
    let volume = format!("{}:/out", out.display());
    cmd!(
        sh,
        "docker run --rm --network none --user {user} -v {volume} petra:dev certs --out /out"
    )
    .run()
    .context("`docker run petra:dev certs --out /out` failed")?;
    for file in COMPONENT_FILES {
        let path = out.join(file);
        let meta = fs::metadata(&path).with_context(|| {
            format!(
                "the image's certs subcommand wrote no {file}, which the overlays' certs component reads"
            )
        })?;
        ensure!(
            meta.uid() == owner.uid(),
            "{} belongs to uid {}, not to the user who ran it ({})",
            path.display(),
            meta.uid(),
            owner.uid()
        );
    }
    println!(
        "petra:dev certs wrote the {} files an overlay needs, owned by {user}",
        COMPONENT_FILES.len()
    );
    fs::remove_dir_all(&out).ok();
    Ok(())
}
