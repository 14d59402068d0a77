"""Renders the manifests: a scratch copy of k8s/ with certificates, and `kubectl kustomize` of the
bases, every overlay, and every overlay + component combination that makes sense (one certificate
source, at most one entry point, at most one provider). `cargo xtask k8s` checks what this renders;
`cargo xtask audit` runs checkov on the same output (`python -m checks render`)."""

from __future__ import annotations

import concurrent.futures
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from .objects import LOADER, dig, load_yaml
from .report import Report, finish


# How each component combines. A component that is in none of these sets fails the run, so a new
# one gets a deliberate place in the combinations.
CERT_COMPONENTS = {"cert-manager"}  # replaces an overlay's `certs` component
ENTRY_COMPONENTS = {"ingress", "gateway-api"}  # need Klaus in the overlay
PROVIDER_COMPONENTS = {"aws", "azure", "gke"}  # last in the list, at most one
ADDON_COMPONENTS = {"prometheus-operator", "otlp-traces"}  # add objects of their own; rendered with each overlay
# Part of the overlays that list them already (the two-cluster topology's external name); never added on top.
INCLUDED_COMPONENTS = {"petra-endpoint"}


class Render:
    """One build: its name (the overlay and its components joined by `+`), the overlay or base it
    started from, the components added, and the documents kubectl kustomize wrote."""

    def __init__(self, name: str, overlay: str, components: list[str], text: str) -> None:
        self.name = name
        self.overlay = overlay
        self.components = components
        self.text = text
        self.docs = [d for d in yaml.load_all(text, Loader=LOADER) if d]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict | None:
        for doc in self.docs:
            if doc.get("kind") == kind and dig(doc, "metadata", "name") == name:
                return doc
        return None

    @property
    def provider(self) -> str | None:
        return next((c for c in self.components if c in PROVIDER_COMPONENTS), None)

    @property
    def namespace(self) -> str | None:
        ns = self.of_kind("Namespace")
        return dig(ns[0], "metadata", "name") if ns else None


def endpoint_host(k8s: Path) -> str:
    """Petra's external name, from the one place it is set."""
    doc = load_yaml(k8s / "components" / "petra-endpoint" / "kustomization.yaml")
    for gen in doc.get("configMapGenerator") or []:
        for literal in gen.get("literals") or []:
            if literal.startswith("host="):
                return literal.split("=", 1)[1]
    raise SystemExit("k8s/components/petra-endpoint: no `host=` literal")


def make_certs(certs_cmd: list[str], root: Path, report: Report, scratch: Path, host: str) -> Path:
    """Writes throwaway certificates with the project's certs tool, SAN `host` included."""
    out = scratch / "certs"
    cmd = certs_cmd + ["--out", str(out), "--san", host, "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if result.returncode != 0:
        report.fail("certs", f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()[-2000:]}")
        raise SystemExit(finish(report))
    for name in ["ca.crt", "petra/tls.crt", "petra/tls.key", "petra/ca.crt",
                 "klaus/tls.crt", "klaus/tls.key", "klaus/ca.crt"]:
        report.check((out / name).is_file(), "certs", f"the certs tool wrote no {name}")
    return out


def placeholder_certs(scratch: Path) -> Path:
    """Stand-ins for the certificate files: the certs components' secretGenerators read them, and any
    content renders the same manifests. Enough where the certificates themselves are not checked."""
    out = scratch / "certs"
    for part in ["petra", "klaus"]:
        (out / part).mkdir(parents=True)
        for name in ["tls.crt", "tls.key", "ca.crt"]:
            (out / part / name).write_text("placeholder\n")
    return out


def scratch_copy(k8s: Path, scratch: Path, certs: Path) -> Path:
    """A copy of k8s/ without any certificate or key, with `certs` in every overlay's certs folder."""
    scratch_k8s = scratch / "k8s"
    shutil.copytree(k8s, scratch_k8s, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.pem"))
    for certs_dir in scratch_k8s.glob("overlays/*/certs"):
        for part in ["petra", "klaus"]:
            shutil.copytree(certs / part, certs_dir / part, dirs_exist_ok=True)
    return scratch_k8s


def discover(k8s: Path, report: Report) -> tuple[list[str], list[str]]:
    overlays, components = [], []
    for d in sorted((k8s / "overlays").iterdir()):
        kfile = d / "kustomization.yaml"
        if kfile.is_file() and (load_yaml(kfile) or {}).get("kind", "Kustomization") == "Kustomization":
            overlays.append(d.name)
    for d in sorted((k8s / "components").iterdir()):
        if (d / "kustomization.yaml").is_file():
            components.append(d.name)
            known = CERT_COMPONENTS | ENTRY_COMPONENTS | PROVIDER_COMPONENTS | ADDON_COMPONENTS | INCLUDED_COMPONENTS
            report.check(d.name in known, f"k8s/components/{d.name}",
                         "unknown component: give it a place in the combinations (xtask/k8s/checks/render.py)")
    return overlays, components


def kustomize(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True)


def variant_dir(scratch_k8s: Path, overlay: str, comps: list[str]) -> Path:
    """A sibling copy of the overlay with the components switched in, as a user would edit it."""
    src = scratch_k8s / "overlays" / overlay
    if not comps:
        return src
    dst = scratch_k8s / "overlays" / f"{overlay}@{'+'.join(comps)}"
    shutil.copytree(src, dst)
    kfile = dst / "kustomization.yaml"
    doc = load_yaml(kfile)
    listed = list(doc.get("components") or [])
    for comp in comps:
        path = f"../../components/{comp}"
        if comp in CERT_COMPONENTS:
            listed = [path if c == "certs" else c for c in listed]
        else:
            listed.append(path)
    doc["components"] = listed
    kfile.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst


def render_all(report: Report, k8s: Path, scratch_k8s: Path) -> list[Render]:
    """Every base, overlay and overlay + component combination, in a stable order."""
    overlays, components = discover(k8s, report)
    jobs: list[tuple[str, str, list[str], Path]] = []
    # The bases must build on their own too: an overlay may take any of them.
    bases = [k8s / "base"] + sorted(p.parent for p in (k8s / "base").glob("*/kustomization.yaml"))
    for base in bases:
        rel = base.relative_to(k8s).as_posix()
        jobs.append((rel.replace("/", "-"), rel, [], scratch_k8s / rel))
    plan = []
    for overlay in overlays:
        plain = kustomize(scratch_k8s / "overlays" / overlay)
        if not report.check(plain.returncode == 0, f"overlays/{overlay}", plain.stderr.strip()):
            continue
        docs = [d for d in yaml.load_all(plain.stdout, Loader=LOADER) if d]
        has_klaus = any(d.get("kind") == "Deployment" and dig(d, "metadata", "name") == "klaus" for d in docs)
        listed = load_yaml(scratch_k8s / "overlays" / overlay / "kustomization.yaml").get("components") or []
        certs = [[]] + ([[c] for c in sorted(CERT_COMPONENTS & set(components))] if "certs" in listed else [])
        entries = [[]] + ([[c] for c in sorted(ENTRY_COMPONENTS & set(components))] if has_klaus else [])
        providers = [[]] + [[c] for c in sorted(PROVIDER_COMPONENTS & set(components))]
        for cert in certs:
            for entry in entries:
                for provider in providers:
                    plan.append((overlay, cert + entry + provider))
        plan.extend((overlay, [c]) for c in sorted(ADDON_COMPONENTS & set(components)))
    for overlay, comps in plan:
        name = overlay + "".join(f"+{c}" for c in comps)
        jobs.append((name, f"overlays/{overlay}", comps, variant_dir(scratch_k8s, overlay, comps)))

    def run(job):
        name, overlay, comps, path = job
        return job, kustomize(path)

    renders: list[Render] = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for (name, overlay, comps, _), result in pool.map(run, jobs):
            if report.check(result.returncode == 0, name, f"kubectl kustomize failed: {result.stderr.strip()}"):
                renders.append(Render(name, overlay, comps, result.stdout))
    return renders


def write(renders: list[Render], outdir: Path, distinct: bool = False) -> int:
    """Writes each render to `outdir/bases/NAME.yaml` or `outdir/overlays/NAME.yaml`; returns the number of
    documents written. With `distinct`, a document goes only into the first render that produced it (a
    scanner then reads each object once)."""
    if outdir.exists():
        shutil.rmtree(outdir)
    seen: set[str] = set()
    written = 0
    for r in renders:
        folder = outdir / ("overlays" if r.overlay.startswith("overlays/") else "bases")
        folder.mkdir(parents=True, exist_ok=True)
        docs = [d.strip() for d in r.text.split("\n---\n") if d.strip()]
        if distinct:
            docs = [d for d in docs if d not in seen]
            seen.update(docs)
        if docs:
            (folder / f"{r.name}.yaml").write_text("\n---\n".join(docs) + "\n")
            written += len(docs)
    return written


def render_command(root: Path, out: Path, distinct: bool, checkov_cases: Path | None) -> int:
    """`python -m checks render`: renders what `check` checks, with placeholder certificates, into `out`;
    and, with `checkov_cases`, the workloads that checkov_cases.py breaks for checkov's self-test."""
    report = Report()
    report.step = "render"
    k8s = root / "k8s"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="k8s-render-", dir=out.parent) as scratch:
        scratch_k8s = scratch_copy(k8s, Path(scratch), placeholder_certs(Path(scratch)))
        renders = render_all(report, k8s, scratch_k8s)
    if report.failures:
        return finish(report)
    documents = write(renders, out, distinct)
    overlays = sum(r.overlay.startswith("overlays/") for r in renders)
    print(f"render: {len(renders)} builds ({len(renders) - overlays} bases, {overlays} overlay combinations): "
          f"{documents}{' distinct' if distinct else ''} documents in {out}")
    if checkov_cases is not None:
        # Imported here: the cases build on this module's renders.
        from .checkov_cases import write_cases

        if checkov_cases.exists():
            shutil.rmtree(checkov_cases)
        print(f"render: {write_cases(renders, checkov_cases)} broken workloads for checkov in {checkov_cases}")
    return 0
