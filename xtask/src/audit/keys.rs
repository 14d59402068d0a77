//! No private key in the repository: neither in a file git would commit (tracked, or untracked and not
//! ignored) nor named like a key file; and the PEM armor test the image layer scan shares.

use anyhow::{Context, bail};
use xshell::{Shell, cmd};

/// File names that hold keys or key stores, whatever their content.
pub(super) const KEY_FILE_SUFFIXES: &[&str] = &[
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

/// A PEM private key of any kind (PKCS#8, RSA, EC, encrypted, OpenSSH, PGP), as `git grep -E`.
/// Written so that this line does not match itself.
const KEY_ARMOR_RE: &str = "-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----";

/// An AWS access key id, the one cloud credential with a fixed, recognisable shape.
const AWS_KEY_ID_RE: &str = "(^|[^A-Z0-9])AKIA[0-9A-Z]{16}([^A-Z0-9]|$)";

/// Fails if a file git would commit (tracked, or untracked and not ignored) holds a private key
/// or is named like a key file.
pub(super) fn repo_keys(sh: &Shell) -> anyhow::Result<()> {
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

/// Whether `data` holds PEM armor of a private key: `-----BEGIN `, a label of capitals, digits
/// and spaces that contains `PRIVATE KEY`, and `-----`.
pub(super) fn has_private_key_armor(data: &[u8]) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_key_armor_is_found_and_certificates_are_not() {
        // Spelled out in pieces so that this file holds no armor for `repo_keys` to find.
        let label = ["PRIVATE", "KEY"].join(" ");
        for kind in ["", "EC ", "RSA ", "ENCRYPTED ", "OPENSSH "] {
            let pem = format!("x\n-----BEGIN {kind}{label}-----\nAAAA\n");
            assert!(has_private_key_armor(pem.as_bytes()), "{pem}");
        }
        for text in [
            "-----BEGIN CERTIFICATE-----\nAAAA\n".to_owned(),
            format!("-----BEGIN {label}"),
            format!("-----BEGIN lower {label}-----"),
        ] {
            assert!(!has_private_key_armor(text.as_bytes()), "{text}");
        }
    }
}
