"""Provider neutrality: the base and every render without a provider component name no cloud; each
provider component adds its own annotations. And what the k8s/ source tree itself may hold."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from .objects import dig
from .render import Render
from .report import Report


# Strings that mark a cloud provider. None may appear in the base or in a render without a
# provider component; each provider component must produce its own.
PROVIDER_MARKERS = re.compile(
    r"aws|amazon|elbv2|\beks\b|azure|\baks\b|gke|\bgce\b|google|service\.beta\.kubernetes\.io"
    r"|networking\.gke\.io|alb\.ingress",
    re.IGNORECASE,
)
PROVIDER_OWN_MARKER = {
    "aws": "service.beta.kubernetes.io/aws-load-balancer",
    "azure": "service.beta.kubernetes.io/azure-load-balancer",
    "gke": "cloud.google.com/",
}
# Fields that only mean something on one provider's cluster.
PROVIDER_FIELDS = [
    ("Service", ("spec", "loadBalancerClass")),
    ("Service", ("spec", "loadBalancerIP")),
    ("Ingress", ("spec", "ingressClassName")),
    ("Gateway", ("spec", "gatewayClassName")),
]


def check_provider_neutral(report: Report, r: Render) -> None:
    if r.provider is not None:
        own = PROVIDER_OWN_MARKER[r.provider]
        report.check(own in r.text, r.name, f"component {r.provider} adds no {own}* annotation")
        return
    # Secret payloads are base64 of random keys: any three letters turn up in them by chance.
    visible = [{**d, "data": sorted(d.get("data") or {})} if d.get("kind") == "Secret" else d for d in r.docs]
    match = PROVIDER_MARKERS.search(yaml.safe_dump_all(visible))
    report.check(match is None, r.name, f"provider-specific text {match.group(0) if match else ''!r} "
                                        "without a provider component")
    for doc in r.docs:
        for kind, path in PROVIDER_FIELDS:
            if doc.get("kind") == kind:
                report.check(dig(doc, *path) is None, f"{r.name}: {kind}/{dig(doc, 'metadata', 'name')}",
                             f"{'.'.join(path)} is provider-specific")


def check_sources(report: Report, root: Path, k8s: Path) -> None:
    """What is in the k8s/ source tree itself: provider-neutral base, no keys, ignored cert folders."""
    for path in sorted((k8s / "base").rglob("*")):
        if path.is_file():
            match = PROVIDER_MARKERS.search(path.read_text())
            report.check(match is None, path.relative_to(root).as_posix(),
                         f"provider-specific text {match.group(0) if match else ''!r} in the base")
    tracked = subprocess.run(["git", "ls-files", "--others", "--cached", "--exclude-standard", "k8s"],
                             capture_output=True, text=True, cwd=root).stdout.split()
    for name in tracked:
        text = (root / name).read_text(errors="replace") if (root / name).is_file() else ""
        report.check("PRIVATE KEY" not in text and not name.endswith((".key", ".crt", ".pem")), name,
                     "a key or certificate would be committed")
        report.check(not re.search(r"^kind:\s*Secret\b", text, re.M), name,
                     "a Secret in the source tree: generate it (secretGenerator) or let cert-manager issue it")
    for overlay in sorted((k8s / "overlays").glob("*/certs")):
        for probe in ["ca.key", "ca.crt", "petra/tls.key", "klaus/tls.key"]:
            path = (overlay / probe).relative_to(root).as_posix()
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
            report.check(ignored, path, "not gitignored: `cargo xtask certs --out` would leave it committable")
