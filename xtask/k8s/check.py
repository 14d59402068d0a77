"""Renders and checks the Kubernetes manifests under k8s/; `cargo xtask k8s` runs it in its venv.

Steps, each counted and printed:
  1. certs      throwaway certificates (the project's own tool) copied into a scratch copy of k8s/
  2. render     `kubectl kustomize` of the bases, every overlay, and every overlay + component
                combination that makes sense (one certificate source, at most one entry point,
                at most one provider)
  3. schema     every rendered document against the official Kubernetes JSON schemas of several
                minor versions in strict mode (kubernetes-validate), and cert-manager / Gateway API
                objects against the CRD-derived schemas in ./schemas
  4. policy     Pod Security "restricted", resources, probes, image tags, labels, references
                between objects, NetworkPolicy reachability, provider-neutral base and overlays,
                every URL in Klaus's PETRA_URL (an in-cluster one: a headless Service whose ready
                pods Klaus may reach and whose name Petra's certificate carries; an external one:
                egress open; the local Petra before the other cluster's)
  5. contract   ports, probe paths, env var names and shutdown timing against what the binaries
                report (`petra contract`, `klaus contract`) and against docker-compose*.yml

Every failure names the rendered combination and the object; the last line reads
"k8s: N passed, M failed".
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import copy
import functools
import ipaddress
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml

# kubernetes-validate reads and parses the (large) schema files on every call; the same few files
# serve every document here, so keep them.
if hasattr(kubernetes_validate.utils, "schema_contents"):
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
        kubernetes_validate.utils.schema_contents
    )

# How each component combines. A component that is in none of these sets fails the run, so a new
# one gets a deliberate place in the combinations.
CERT_COMPONENTS = {"cert-manager"}  # replaces an overlay's `certs` component
ENTRY_COMPONENTS = {"ingress", "gateway-api"}  # need Klaus in the overlay
PROVIDER_COMPONENTS = {"aws", "azure", "gke"}  # last in the list, at most one
ADDON_COMPONENTS = {"prometheus-operator"}  # adds objects of its own; rendered with each overlay
# Part of the overlays that list them already (the two-cluster topology's external name); never added on top.
INCLUDED_COMPONENTS = {"petra-endpoint"}

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

# Pod Security Standards, "restricted" profile: the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
UID = 65532
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}
# Env vars that hold a path to one of the TLS files.
FILE_VARS = re.compile(r"^(TLS_.*_FILE|PETRA_.*_FILE)$")


class Report:
    """Counts checks per step and collects failures."""

    def __init__(self) -> None:
        self.passed: Counter[str] = Counter()
        self.failures: list[str] = []
        self.step = ""

    def check(self, ok: bool, where: str, message: str) -> bool:
        if ok:
            self.passed[self.step] += 1
        else:
            self.failures.append(f"[{self.step}] {where}: {message}")
        return ok

    def fail(self, where: str, message: str) -> None:
        self.check(False, where, message)


# ----------------------------------------------------------------------------------------------
# Small helpers


def dig(obj, *path, default=None):
    for key in path:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
        elif isinstance(obj, list) and isinstance(key, int) and -len(obj) <= key < len(obj):
            obj = obj[key]
        else:
            return default
    return obj


# libyaml's parser where the wheel has it: parsing ~1,300 rendered documents is the slow part.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml(path: Path):
    with path.open() as f:
        return yaml.load(f, Loader=LOADER)


def labels_match(selector: dict | None, labels: dict) -> bool:
    """A Kubernetes label selector; an empty selector matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def addr_port(value: str) -> int | None:
    match = re.search(r":(\d+)$", value or "")
    return int(match.group(1)) if match else None


def pod_spec(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return dig(workload, "spec", "jobTemplate", "spec", "template", "spec", default={})
    return dig(workload, "spec", "template", "spec", default={})


def pod_labels(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return dig(workload, "spec", "jobTemplate", "spec", "template", "metadata", "labels", default={})
    return dig(workload, "spec", "template", "metadata", "labels", default={})


def containers(spec: dict) -> list[dict]:
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def image_repo(image: str) -> str:
    """`registry/path/petra:0.1.0@sha256:...` -> `petra`."""
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":")[0]


def image_tag(image: str) -> str | None:
    name = image.split("@")[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def env_map(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


# ----------------------------------------------------------------------------------------------
# Step 1 and 2: scratch copy, certificates, combinations, rendering


class Render:
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


def make_certs(args, report: Report, scratch: Path, host: str) -> Path:
    """Writes throwaway certificates with the project's certs tool, SAN `host` included."""
    out = scratch / "certs"
    cmd = args.certs_cmd + ["--out", str(out), "--san", host, "--force"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=args.root)
    if result.returncode != 0:
        report.fail("certs", f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()[-2000:]}")
        raise SystemExit(finish(report))
    for name in ["ca.crt", "petra/tls.crt", "petra/tls.key", "petra/ca.crt",
                 "klaus/tls.crt", "klaus/tls.key", "klaus/ca.crt"]:
        report.check((out / name).is_file(), "certs", f"the certs tool wrote no {name}")
    return out


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
                         "unknown component: give it a place in check.py's combinations")
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


def render_all(args, report: Report, k8s: Path, scratch_k8s: Path, outdir: Path) -> list[Render]:
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
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("*.yaml"):
        old.unlink()
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for (name, overlay, comps, _), result in pool.map(run, jobs):
            if report.check(result.returncode == 0, name, f"kubectl kustomize failed: {result.stderr.strip()}"):
                (outdir / f"{name}.yaml").write_text(result.stdout)
                renders.append(Render(name, overlay, comps, result.stdout))
    return renders


# ----------------------------------------------------------------------------------------------
# Step 3: schemas


def check_schemas(report: Report, renders: list[Render], versions: list[str], schema_dir: Path) -> dict:
    crd_schemas = {}
    for path in schema_dir.glob("*.json"):
        group, version, kind = path.stem.split("_")
        crd_schemas[(f"{group}/{version}", kind)] = json.loads(path.read_text())
    unique: dict[str, tuple[dict, str]] = {}
    total = 0
    for render in renders:
        for doc in render.docs:
            total += 1
            key = json.dumps(doc, sort_keys=True)
            unique.setdefault(key, (doc, render.name))
    stats = Counter()
    for doc, where in unique.values():
        ident = f"{where}: {doc.get('kind')}/{dig(doc, 'metadata', 'name')}"
        schema = crd_schemas.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is not None:
            errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(doc), key=lambda e: e.path)
            message = "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:3])
            report.check(not errors, ident, f"CRD schema: {message}")
            stats["crd"] += 1
            continue
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                report.check(True, ident, "")
            except kubernetes_validate.ValidationError as err:
                report.fail(ident, f"Kubernetes {version} strict schema: "
                                   f"{'.'.join(map(str, err.path))}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError:
                report.fail(ident, f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes "
                                   f"{version}, nor in xtask/k8s/schemas")
            stats["k8s"] += 1
    return {"documents": total, "unique": len(unique), "k8s_validations": stats["k8s"],
            "crd_validations": stats["crd"]}


# ----------------------------------------------------------------------------------------------
# Step 4: policy


def check_pod_security(report: Report, where: str, spec: dict) -> None:
    """Pod Security Standards, restricted profile, plus what this project adds to it."""
    psc = spec.get("securityContext") or {}
    for field in ["hostNetwork", "hostPID", "hostIPC"]:
        report.check(not spec.get(field), where, f"{field} must not be set")
    report.check(psc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    report.check(psc.get("runAsUser") == UID, where, f"pod securityContext.runAsUser must be {UID}")
    report.check(dig(psc, "seccompProfile", "type") == "RuntimeDefault", where,
                 "pod securityContext.seccompProfile.type must be RuntimeDefault")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        report.check(kinds <= RESTRICTED_VOLUMES, where, f"volume {volume['name']}: {kinds} not allowed")
    report.check(spec.get("automountServiceAccountToken") is False, where,
                 "automountServiceAccountToken must be false on the pod")
    for c in containers(spec):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        report.check(sc.get("allowPrivilegeEscalation") is False, cw, "allowPrivilegeEscalation must be false")
        report.check(not sc.get("privileged"), cw, "privileged")
        report.check("ALL" in (dig(sc, "capabilities", "drop") or []), cw, "capabilities.drop must hold ALL")
        added = set(dig(sc, "capabilities", "add") or [])
        report.check(added <= {"NET_BIND_SERVICE"}, cw, f"capabilities.add {added}")
        report.check(sc.get("readOnlyRootFilesystem") is True, cw, "readOnlyRootFilesystem must be true")
        report.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cw, "runAsNonRoot")
        report.check(sc.get("runAsUser", psc.get("runAsUser")) == UID, cw, f"runAsUser must be {UID}")
        seccomp = dig(sc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")
        report.check(seccomp in ("RuntimeDefault", "Localhost"), cw, "seccompProfile")
        for port in c.get("ports") or []:
            report.check("hostPort" not in port, cw, "hostPort")
        for kind in ["requests", "limits"]:
            for res in ["cpu", "memory"]:
                report.check(dig(c, "resources", kind, res) is not None, cw, f"resources.{kind}.{res} missing")
        image = c.get("image", "")
        tag = image_tag(image)
        report.check("@sha256:" in image or (tag is not None and tag != "latest"), cw,
                     f"image {image!r}: needs a version tag (not latest) or a digest")


def check_workloads(report: Report, r: Render) -> None:
    accounts = {dig(sa, "metadata", "name"): sa for sa in r.of_kind("ServiceAccount")}
    for wl in [d for d in r.docs if d.get("kind") in WORKLOAD_KINDS]:
        name = dig(wl, "metadata", "name")
        where = f"{r.name}: {wl['kind']}/{name}"
        spec = pod_spec(wl)
        check_pod_security(report, where, spec)
        sa_name = spec.get("serviceAccountName", "default")
        sa = accounts.get(sa_name)
        if report.check(sa is not None, where, f"ServiceAccount {sa_name} is not in the render"):
            report.check(sa.get("automountServiceAccountToken") is False, where,
                         f"ServiceAccount {sa_name}: automountServiceAccountToken must be false")
        report.check(spec.get("enableServiceLinks") is False, where, "enableServiceLinks must be false")
        labels = pod_labels(wl)
        report.check(labels.get("app.kubernetes.io/name") == name, where,
                     "pod template needs app.kubernetes.io/name")
        if wl["kind"] != "Deployment":
            continue
        report.check((dig(wl, "spec", "replicas") or 1) >= 2, where, "needs at least 2 replicas")
        report.check(dig(wl, "spec", "strategy", "rollingUpdate", "maxUnavailable") == 0, where,
                     "rolling update needs maxUnavailable: 0")
        spread = {t.get("topologyKey"): t for t in spec.get("topologySpreadConstraints") or []}
        for key in ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]:
            if report.check(key in spread, where, f"topologySpreadConstraints: none over {key}"):
                report.check(labels_match(spread[key].get("labelSelector"), labels), where,
                             f"topology spread over {key} does not select its own pods")
        report.check(dig(spread, "topology.kubernetes.io/zone", "whenUnsatisfiable") == "ScheduleAnyway",
                     where, "zone spread must be ScheduleAnyway (nodes without zones, e.g. kind)")
        pdbs = [p for p in r.of_kind("PodDisruptionBudget") if labels_match(dig(p, "spec", "selector"), labels)]
        report.check(len(pdbs) == 1, where, f"needs exactly one PodDisruptionBudget, found {len(pdbs)}")
        hpas = [h for h in r.of_kind("HorizontalPodAutoscaler")
                if dig(h, "spec", "scaleTargetRef", "kind") == "Deployment"
                and dig(h, "spec", "scaleTargetRef", "name") == name]
        if report.check(len(hpas) == 1, where, "needs one HorizontalPodAutoscaler"):
            hpa = hpas[0]
            report.check(hpa["apiVersion"] == "autoscaling/v2", where, "HPA must be autoscaling/v2")
            report.check(dig(hpa, "spec", "minReplicas", default=1) >= 2, where, "HPA minReplicas must be >= 2")
        services = [s for s in r.of_kind("Service") if dig(s, "spec", "selector")
                    and labels_match({"matchLabels": dig(s, "spec", "selector")}, labels)]
        report.check(bool(services), where, "no Service selects these pods")


def check_labels(report: Report, r: Render) -> None:
    for doc in r.docs:
        labels = dig(doc, "metadata", "labels", default={})
        where = f"{r.name}: {doc['kind']}/{dig(doc, 'metadata', 'name')}"
        report.check(labels.get("app.kubernetes.io/part-of") == "petra-klaus", where,
                     "label app.kubernetes.io/part-of: petra-klaus missing")
        if doc["kind"] in WORKLOAD_KINDS | {"Service", "ServiceAccount", "PodDisruptionBudget",
                                            "HorizontalPodAutoscaler", "ConfigMap", "Secret"}:
            report.check("app.kubernetes.io/name" in labels, where, "label app.kubernetes.io/name missing")


def produced_secrets(r: Render) -> dict[str, set[str]]:
    """Secret name -> keys, for Secrets in the render and those cert-manager will write."""
    out = {}
    for s in r.of_kind("Secret"):
        out[dig(s, "metadata", "name")] = set((s.get("data") or {}) | (s.get("stringData") or {}))
    for c in r.of_kind("Certificate"):
        out[dig(c, "spec", "secretName")] = set(TLS_KEYS)
    return out


def check_references(report: Report, r: Render) -> None:
    secrets = produced_secrets(r)
    configmaps = {dig(c, "metadata", "name"): c.get("data") or {} for c in r.of_kind("ConfigMap")}
    for s in r.of_kind("Secret"):
        where = f"{r.name}: Secret/{dig(s, 'metadata', 'name')}"
        if s.get("type") == "kubernetes.io/tls":
            report.check(set(s.get("data") or {}) == TLS_KEYS, where, f"keys must be {sorted(TLS_KEYS)}")
    for wl in [d for d in r.docs if d.get("kind") in WORKLOAD_KINDS]:
        where = f"{r.name}: {wl['kind']}/{dig(wl, 'metadata', 'name')}"
        spec = pod_spec(wl)
        for volume in spec.get("volumes") or []:
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                report.check(name in secrets, where, f"volume {volume['name']}: Secret {name} is made by nothing")
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                report.check(name in configmaps, where, f"volume {volume['name']}: ConfigMap {name} missing")
        for c in containers(spec):
            for e in c.get("env") or []:
                ref = dig(e, "valueFrom", "configMapKeyRef")
                if ref:
                    report.check(ref["key"] in configmaps.get(ref["name"], {}), where,
                                 f"env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']}")
                ref = dig(e, "valueFrom", "secretKeyRef")
                if ref:
                    report.check(ref["key"] in secrets.get(ref["name"], set()), where,
                                 f"env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
    workloads = [d for d in r.docs if d.get("kind") in WORKLOAD_KINDS]
    for svc in r.of_kind("Service"):
        where = f"{r.name}: Service/{dig(svc, 'metadata', 'name')}"
        selector = dig(svc, "spec", "selector")
        targets = [w for w in workloads if selector and labels_match({"matchLabels": selector}, pod_labels(w))]
        if not report.check(bool(targets), where, "selects no pods"):
            continue
        for port in dig(svc, "spec", "ports", default=[]):
            target = port.get("targetPort", port["port"])
            ok = all(resolve_port(w, target) is not None for w in targets)
            report.check(ok, where, f"targetPort {target} is not a container port")
    for ing in r.of_kind("Ingress"):
        where = f"{r.name}: Ingress/{dig(ing, 'metadata', 'name')}"
        for rule in dig(ing, "spec", "rules", default=[]):
            for path in dig(rule, "http", "paths", default=[]):
                backend = dig(path, "backend", "service")
                svc = r.get("Service", backend["name"])
                if report.check(svc is not None, where, f"backend Service {backend['name']} missing"):
                    names = {p.get("name") for p in svc["spec"]["ports"]}
                    numbers = {p["port"] for p in svc["spec"]["ports"]}
                    port = backend["port"]
                    report.check(port.get("name") in names or port.get("number") in numbers, where,
                                 f"backend port {port} not on Service {backend['name']}")
    for route in r.of_kind("HTTPRoute"):
        where = f"{r.name}: HTTPRoute/{dig(route, 'metadata', 'name')}"
        for rule in dig(route, "spec", "rules", default=[]):
            for ref in rule.get("backendRefs") or []:
                svc = r.get("Service", ref["name"])
                if report.check(svc is not None, where, f"backend Service {ref['name']} missing"):
                    report.check(ref.get("port") in {p["port"] for p in svc["spec"]["ports"]}, where,
                                 f"backend port {ref.get('port')} not on Service {ref['name']}")
    issuers = {dig(i, "metadata", "name"): i for i in r.of_kind("Issuer")}
    for cert in r.of_kind("Certificate"):
        where = f"{r.name}: Certificate/{dig(cert, 'metadata', 'name')}"
        ref = dig(cert, "spec", "issuerRef")
        if ref.get("kind", "Issuer") == "Issuer":
            report.check(ref["name"] in issuers, where, f"Issuer {ref['name']} missing")
    for issuer in issuers.values():
        name = dig(issuer, "spec", "ca", "secretName")
        if name:
            report.check(name in secrets, f"{r.name}: Issuer/{dig(issuer, 'metadata', 'name')}",
                         f"CA Secret {name} is made by nothing")
    for hpa in r.of_kind("HorizontalPodAutoscaler"):
        ref = dig(hpa, "spec", "scaleTargetRef")
        report.check(r.get(ref["kind"], ref["name"]) is not None, f"{r.name}: HPA/{dig(hpa, 'metadata', 'name')}",
                     f"scale target {ref['kind']}/{ref['name']} missing")


def resolve_port(workload: dict, port) -> int | None:
    for c in pod_spec(workload).get("containers") or []:
        for p in c.get("ports") or []:
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
    return None


# NetworkPolicy reachability. A peer is ("pod", labels) in the same namespace, ("other-ns", labels,
# namespace labels) for a pod elsewhere in the cluster (an ingress controller, Prometheus, DNS), or
# ("world", address). Kubelet probes come from the pod's own node, which NetworkPolicy always allows,
# so they need no peer here.


def peer_matches(peers, peer) -> bool:
    if not peers:
        return True
    kind, value = peer[0], peer[1]
    for p in peers:
        if "ipBlock" in p:
            if kind == "world":
                try:
                    net = ipaddress.ip_network(p["ipBlock"]["cidr"])
                except ValueError:
                    continue  # not a range: the API server refuses it, and check_policy_rules says so
                addr = ipaddress.ip_address(value)
                excepted = any(addr in ipaddress.ip_network(e) for e in p["ipBlock"].get("except") or [])
                if addr.version == net.version and addr in net and not excepted:
                    return True
            continue
        ns_sel, pod_sel = p.get("namespaceSelector"), p.get("podSelector")
        if kind == "pod" and labels_match(pod_sel, value):
            if ns_sel is None or ns_sel == {}:
                return True
        if kind == "other-ns" and ns_sel is not None and labels_match(ns_sel, peer[2]) \
                and labels_match(pod_sel, value):
            return True
    return False


def port_matches(rule_ports, port: int, protocol: str, workload: dict | None) -> bool:
    if not rule_ports:
        return True
    for rp in rule_ports:
        if rp.get("protocol", "TCP") != protocol:
            continue
        p = rp.get("port")
        if p is None:
            return True
        if isinstance(p, str):
            p = resolve_port(workload, p) if workload else None
        if p is not None and p <= port <= rp.get("endPort", p):
            return True
    return False


def policy_types(policy: dict) -> list[str]:
    types = dig(policy, "spec", "policyTypes")
    if types:
        return types
    return ["Ingress"] + (["Egress"] if dig(policy, "spec", "egress") else [])


def ingress_allowed(r: Render, target: dict, port: int, source, protocol: str = "TCP") -> bool:
    labels = pod_labels(target)
    policies = [p for p in r.of_kind("NetworkPolicy")
                if "Ingress" in policy_types(p) and labels_match(dig(p, "spec", "podSelector"), labels)]
    if not policies:
        return True
    return any(peer_matches(rule.get("from"), source) and port_matches(rule.get("ports"), port, protocol, target)
               for p in policies for rule in dig(p, "spec", "ingress", default=[]) or [])


def egress_allowed(r: Render, source: dict, port: int, dest, protocol: str = "TCP", dest_wl=None) -> bool:
    labels = pod_labels(source)
    policies = [p for p in r.of_kind("NetworkPolicy")
                if "Egress" in policy_types(p) and labels_match(dig(p, "spec", "podSelector"), labels)]
    if not policies:
        return True
    return any(peer_matches(rule.get("to"), dest) and port_matches(rule.get("ports"), port, protocol, dest_wl)
               for p in policies for rule in dig(p, "spec", "egress", default=[]) or [])


WORLD = ("world", "203.0.113.7")  # an address outside the cluster (TEST-NET-3)
WORLD6 = ("world", "2001:db8::7")
ELSEWHERE = ("world", "198.51.100.7")  # another address outside the cluster (TEST-NET-2)
STRANGER = ("pod", {"app.kubernetes.io/name": "stranger"})  # another pod in the namespace
# The label a user puts on the namespace of their Prometheus: the one that may reach admin ports.
MONITORING_LABEL = ("petra-klaus/monitoring", "true")
PROMETHEUS = ("other-ns", {"app.kubernetes.io/name": "prometheus"},
              {"kubernetes.io/metadata.name": "monitoring", MONITORING_LABEL[0]: MONITORING_LABEL[1]})
# The same Prometheus in a namespace nobody labelled: a stand-in for any pod of the cluster.
UNLABELLED_NS = ("other-ns", {"app.kubernetes.io/name": "prometheus"}, {"kubernetes.io/metadata.name": "apps"})
KUBE_DNS = ("other-ns", {"k8s-app": "kube-dns"}, {"kubernetes.io/metadata.name": "kube-system"})
INGRESS_CONTROLLER = ("other-ns", {"app": "ingress-controller"}, {"kubernetes.io/metadata.name": "ingress"})

# Address ranges a user must set before applying: placeholders that are on purpose no CIDR, so the
# API server refuses the policy until they are replaced. The checks put in an example range (what a
# user would set) and test reachability with it. Each placeholder names the one file to edit.
PLACEHOLDER_PREFIX = "SET-"
EXAMPLE_RANGES = {
    "SET-PETRA-ADDRESS-RANGE-IN-k8s-components-petra-endpoint": "203.0.113.0/24",  # holds WORLD
    "SET-LOAD-BALANCER-SUBNETS-IN-k8s-components-aws": "10.0.0.0/16",
}
PETRA_LB = ("world", "203.0.113.7")  # Petra's load balancer in the example range
AWS_HEALTH_CHECK = ("world", "10.0.1.7")  # an AWS load balancer in the example subnets


def ip_blocks(policy: dict):
    """(direction, rule, ipBlock) for every ipBlock peer of a NetworkPolicy."""
    for direction, side in (("ingress", "from"), ("egress", "to")):
        for rule in dig(policy, "spec", direction, default=[]) or []:
            for peer in rule.get(side) or []:
                if "ipBlock" in peer:
                    yield direction, rule, peer["ipBlock"]


def with_example_ranges(r: Render) -> Render:
    """A copy of the render with each placeholder range replaced by its example range."""
    out = Render(r.name, r.overlay, r.components, "")
    out.docs = copy.deepcopy(r.docs)
    for policy in out.of_kind("NetworkPolicy"):
        for _, _, block in ip_blocks(policy):
            block["cidr"] = EXAMPLE_RANGES.get(block["cidr"], block["cidr"])
    return out


def check_policy_rules(report: Report, r: Render, admin_ports: set[int]) -> None:
    """What each rule may say, whatever it reaches: no admin port open to every source, no egress to
    every address, DNS only to a selected namespace, address ranges that are ranges or known
    placeholders."""
    for policy in r.of_kind("NetworkPolicy"):
        where = f"{r.name}: NetworkPolicy/{dig(policy, 'metadata', 'name')}"
        for rule in dig(policy, "spec", "ingress", default=[]) or []:
            opened = [port for port in admin_ports if port_matches(rule.get("ports"), port, "TCP", None)]
            report.check(not opened or bool(rule.get("from")), where,
                         f"an ingress rule admits every source on the admin port {opened}: give it a `from`")
        for rule in dig(policy, "spec", "egress", default=[]) or []:
            report.check(bool(rule.get("to")), where, "an egress rule without `to` opens egress to every address")
            if port_matches(rule.get("ports"), 53, "UDP", None) or port_matches(rule.get("ports"), 53, "TCP", None):
                report.check(bool(rule.get("to")) and all("namespaceSelector" in peer for peer in rule["to"]),
                             where, "a DNS egress rule without a namespaceSelector: DNS is the cluster's "
                                    "(kube-system, k8s-app: kube-dns)")
        for direction, _, block in ip_blocks(policy):
            cidr = block.get("cidr", "")
            if cidr.startswith(PLACEHOLDER_PREFIX):
                report.check(cidr in EXAMPLE_RANGES, where, f"unknown placeholder {cidr}: list it in EXAMPLE_RANGES")
                continue
            try:
                net = ipaddress.ip_network(cidr)
            except ValueError:
                report.fail(where, f"ipBlock {cidr!r} is not an address range")
                continue
            report.check(net.prefixlen > 0, where, f"{direction} to every address ({cidr})")


def check_network(report: Report, r: Render, contracts: dict) -> None:
    deployments = {dig(d, "metadata", "name"): d for d in r.of_kind("Deployment")}
    if not deployments:
        return
    where = f"{r.name}: NetworkPolicy"
    deny = [p for p in r.of_kind("NetworkPolicy")
            if dig(p, "spec", "podSelector") in ({}, None) and set(policy_types(p)) == {"Ingress", "Egress"}
            and not dig(p, "spec", "ingress") and not dig(p, "spec", "egress")]
    report.check(bool(deny), where, "no default-deny policy (podSelector {}, Ingress and Egress, no rules)")
    exposed: dict[str, set[int]] = {}  # deployment -> container ports reachable from outside
    for svc in r.of_kind("Service"):
        for name, wl in deployments.items():
            if labels_match({"matchLabels": dig(svc, "spec", "selector") or {"-": "-"}}, pod_labels(wl)):
                if dig(svc, "spec", "type") in ("LoadBalancer", "NodePort"):
                    for p in svc["spec"]["ports"]:
                        exposed.setdefault(name, set()).add(resolve_port(wl, p.get("targetPort", p["port"])))
    check_policy_rules(report, r, {c["ports"]["admin"] for c in contracts.values()})
    r = with_example_ranges(r)
    monitoring = f"{MONITORING_LABEL[0]}={MONITORING_LABEL[1]}"
    for name, wl in deployments.items():
        c = contracts.get(name)
        w = f"{r.name}: pods of {name}"
        if c is None:
            continue
        main, admin = c["ports"]["main"], c["ports"]["admin"]
        report.check(ingress_allowed(r, wl, admin, PROMETHEUS), w,
                     f"admin port {admin} closed to Prometheus in a namespace labelled {monitoring}")
        report.check(not ingress_allowed(r, wl, admin, UNLABELLED_NS), w,
                     f"admin port {admin} open to pods of any namespace, not only those labelled {monitoring}")
        report.check(not ingress_allowed(r, wl, admin, STRANGER), w,
                     f"admin port {admin} open to other pods of its namespace")
        report.check(not ingress_allowed(r, wl, admin, WORLD), w, f"admin port {admin} open to outside addresses")
        if r.provider == "aws":
            report.check(ingress_allowed(r, wl, admin, AWS_HEALTH_CHECK), w,
                         f"admin port {admin} closed to the load balancers' health checks (aws)")
        for proto in ["UDP", "TCP"]:
            report.check(egress_allowed(r, wl, 53, KUBE_DNS, proto), w,
                         f"DNS ({proto} 53) egress blocked (to the kube-dns pods in kube-system)")
            report.check(not egress_allowed(r, wl, 53, WORLD, proto), w,
                         f"DNS ({proto} 53) egress open to outside addresses, not only the cluster's DNS")
            report.check(not egress_allowed(r, wl, 53, UNLABELLED_NS, proto), w,
                         f"DNS ({proto} 53) egress open to pods of any namespace, not only kube-dns")
        report.check(not egress_allowed(r, wl, 5432, WORLD), w, "egress to arbitrary ports is open")
        report.check(not ingress_allowed(r, wl, 5432, STRANGER), w, "ingress to arbitrary ports is open")
        for port in exposed.get(name, set()):
            report.check(ingress_allowed(r, wl, port, WORLD) and ingress_allowed(r, wl, port, WORLD6), w,
                         f"port {port} is behind a load balancer but closed to outside addresses")
        if name == "petra" and not exposed.get("petra"):
            report.check(not ingress_allowed(r, wl, main, STRANGER), w,
                         f"Petra's port {main} is open to any pod, not only Klaus")
            report.check(not ingress_allowed(r, wl, main, WORLD), w, f"Petra's port {main} is open to the world")
        if name == "petra":
            report.check(not egress_allowed(r, wl, 443, WORLD), w, "Petra may open outbound connections")
        if name == "klaus":
            report.check(ingress_allowed(r, wl, main, WORLD), w, f"Klaus's port {main} closed to clients")
            report.check(ingress_allowed(r, wl, main, INGRESS_CONTROLLER), w,
                         f"Klaus's port {main} closed to ingress controllers and gateways")
            check_klaus_to_petra(report, r, wl, deployments.get("petra"), contracts)


def petra_url(r: Render, klaus: dict) -> str | None:
    for c in pod_spec(klaus).get("containers") or []:
        e = env_map(c).get("PETRA_URL")
        if e is None:
            return None
        if "value" in e:
            return e["value"]
        ref = dig(e, "valueFrom", "configMapKeyRef")
        cm = r.get("ConfigMap", ref["name"]) if ref else None
        return dig(cm, "data", ref["key"]) if cm else None
    return None


def petra_urls(r: Render, klaus: dict | None) -> list[str]:
    """PETRA_URL as Klaus reads it: one URL, or a comma-separated list in priority order."""
    url = petra_url(r, klaus) if klaus else None
    return url.split(",") if url else []


# A host that names a Service of Klaus's own cluster: `svc`, `svc.NS.svc` or `svc.NS.svc.cluster.local`.
IN_CLUSTER_HOST = re.compile(r"(?P<svc>[a-z0-9-]+)(\.(?P<ns>[a-z0-9-]+)\.svc(\.cluster\.local)?)?")


@functools.lru_cache(maxsize=None)
def cert_sans(pem_b64: str) -> frozenset[str]:
    """The DNS names and IP addresses of a base64 PEM certificate (a Secret's tls.crt)."""
    out = subprocess.run(["openssl", "x509", "-noout", "-ext", "subjectAltName"], input=base64.b64decode(pem_b64),
                         capture_output=True).stdout.decode()
    return frozenset(re.findall(r"(?:DNS|IP Address):([^,\s]+)", out))


def petra_cert_names(r: Render, petra: dict) -> tuple[str, set[str]] | None:
    """What Petra's serving certificate will be valid for: (its source, names), from the Secret of
    Petra's TLS volume or the cert-manager Certificate that writes it; None when neither is in the render."""
    for volume in pod_spec(petra).get("volumes") or []:
        name = dig(volume, "secret", "secretName")
        if name is None:
            continue
        for cert in r.of_kind("Certificate"):
            if dig(cert, "spec", "secretName") == name:
                return (f"Certificate {dig(cert, 'metadata', 'name')}",
                        set(dig(cert, "spec", "dnsNames", default=[])) | set(dig(cert, "spec", "ipAddresses", default=[])))
        secret = r.get("Secret", name)
        if secret is not None and "tls.crt" in (secret.get("data") or {}):
            return f"Secret {name}", set(cert_sans(secret["data"]["tls.crt"]))
    return None


def check_klaus_to_petra(report: Report, r: Render, klaus: dict, petra: dict | None, contracts: dict) -> None:
    """Every URL in PETRA_URL leads somewhere Klaus may go: an in-cluster one to every ready Petra pod
    through a headless Service whose name Petra's certificate carries, an external one through egress
    to outside addresses; Klaus's own cluster's Petra comes first."""
    w = f"{r.name}: Klaus -> Petra"
    urls = petra_urls(r, klaus)
    if not report.check(bool(urls), w, "PETRA_URL is missing or empty"):
        return
    report.check(len(set(urls)) == len(urls), w, f"PETRA_URL {','.join(urls)} lists a URL twice")
    external = None  # the first URL outside the cluster, once seen
    for priority, url in enumerate(urls):
        wp = f"{w} (priority {priority})"
        if not report.check(url.startswith("https://"), wp, f"PETRA_URL {url!r} must be https://"):
            continue
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or 443
        local = IN_CLUSTER_HOST.fullmatch(host)
        if local is None:
            external = external or host
            # With the range a user sets for Petra's load balancer: open to it, and to nothing else.
            report.check(egress_allowed(r, klaus, port, PETRA_LB), wp,
                         f"egress to {host}:{port} blocked ({PETRA_LB[1]} in the range set for it)")
            for world in (ELSEWHERE, WORLD6):
                report.check(not egress_allowed(r, klaus, port, world), wp,
                             f"egress on {port} open to any address ({world[1]}), not only Petra's range")
            continue
        report.check(external is None, wp, f"{host} is in this cluster but comes after {external}: "
                                            "Klaus's own cluster's Petra must come first")
        check_local_petra(report, wp, r, klaus, petra, host, local, port, contracts)


def check_local_petra(report: Report, w: str, r: Render, klaus: dict, petra: dict | None, host: str,
                      local: re.Match, port: int, contracts: dict) -> None:
    name, namespace = local["svc"], local["ns"]
    if not report.check(petra is not None, w, f"PETRA_URL host {host} is in-cluster but Petra is not in the render"):
        return
    if namespace is not None:
        report.check(namespace == r.namespace, w, f"PETRA_URL names namespace {namespace}, "
                                                  f"the render uses {r.namespace}")
    svc = r.get("Service", name)
    if not report.check(svc is not None, w, f"PETRA_URL host {host}: no Service {name} in the render"):
        return
    selector = dig(svc, "spec", "selector")
    if not report.check(bool(selector) and labels_match({"matchLabels": selector}, pod_labels(petra)), w,
                        f"Service {name} does not select Petra's pods"):
        return
    report.check(dig(svc, "spec", "clusterIP") == "None", w,
                 f"Service {name} is not headless (clusterIP: None): Klaus would see one virtual address, "
                 "not every Petra pod")
    report.check(not dig(svc, "spec", "publishNotReadyAddresses"), w,
                 f"Service {name} publishes Petra pods that are not ready (publishNotReadyAddresses)")
    main = contracts["petra"]["ports"]["main"]
    # A headless Service maps no ports: Klaus connects to each pod's address on the URL's port.
    report.check(port == main, w, f"PETRA_URL port {port}: Klaus connects to Petra's pods directly "
                                  f"(headless Service), and they listen on {main}")
    sport = next((p for p in dig(svc, "spec", "ports", default=[]) if p["port"] == port), None)
    if report.check(sport is not None, w, f"Service {name} has no port {port}"):
        target = resolve_port(petra, sport.get("targetPort", port))
        report.check(target == port, w, f"Service {name} port {port} leads to {target}: a headless Service "
                                        "maps no ports, so both must be Petra's port")
    klaus_pod = ("pod", pod_labels(klaus))
    report.check(egress_allowed(r, klaus, main, ("pod", pod_labels(petra)), dest_wl=petra), w,
                 f"Klaus may not connect to Petra's pods on {main}")
    report.check(ingress_allowed(r, petra, main, klaus_pod), w, f"Petra does not accept Klaus on {main}")
    names = petra_cert_names(r, petra)
    if names is not None:
        source, sans = names
        report.check(host in sans, w, f"Petra's {source} has no SAN {host} (it has {sorted(sans)})")


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


def check_policy(report: Report, r: Render, contracts: dict) -> None:
    check_workloads(report, r)
    check_labels(report, r)
    check_provider_neutral(report, r)
    # A base leaves the Secrets and the namespace's policies to the overlays.
    if r.overlay.startswith("overlays/"):
        check_references(report, r)
        check_network(report, r, contracts)


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


def check_images(report: Report, renders: list[Render]) -> None:
    for r in renders:
        tags = set()
        for wl in [d for d in r.docs if d.get("kind") in WORKLOAD_KINDS]:
            for c in containers(pod_spec(wl)):
                tags.add(image_tag(c["image"]))
                report.check(image_repo(c["image"]) == c["name"], f"{r.name}: {wl['kind']}/{dig(wl, 'metadata', 'name')}",
                             f"image {c['image']} should be REGISTRY/{c['name']}:TAG (kustomize edit set image)")
        report.check(len(tags) <= 1, r.name, f"Petra and Klaus images disagree on the tag: {sorted(map(str, tags))}")
        if r.overlay == "overlays/local":
            report.check(tags <= {"dev"}, r.name, f"the local overlay must use the dev images, has {tags}")


# The overlays of Klaus's cluster in the two-cluster topology, and how many URLs PETRA_URL lists there:
# Petra's external name alone, or the local Petra first and the external name on failure.
KLAUS_CLUSTERS = {"overlays/klaus-cluster": 1, "overlays/klaus-cluster-failover": 2}


def check_two_clusters(report: Report, renders: list[Render], host: str) -> None:
    """The external name is set once and reaches Klaus's URL, the DNS annotation and both certificates."""
    for r in renders:
        if r.overlay in KLAUS_CLUSTERS:
            urls = petra_urls(r, r.get("Deployment", "klaus"))
            want = KLAUS_CLUSTERS[r.overlay]
            last = urlsplit(urls[-1] if urls else "")
            report.check(len(urls) == want, r.name, f"PETRA_URL {','.join(urls)} must list {want} URL(s)")
            # petra-public listens on 443, the https default, so the URL carries no port.
            report.check(last.hostname == host and last.port is None, r.name,
                         f"the last URL in PETRA_URL {','.join(urls)} is not https://{host}")
        if r.overlay == "overlays/klaus-cluster-failover":
            first = urlsplit(urls[0] if urls else "").hostname or ""
            report.check(IN_CLUSTER_HOST.fullmatch(first) is not None, r.name,
                         f"PETRA_URL must start with this cluster's own Petra, not {first}")
            report.check(r.get("Deployment", "petra") is not None and produced_secrets(r).get("petra-tls"), r.name,
                         "Petra and its certificate must run in Klaus's cluster too (Klaus's first choice)")
        if r.overlay == "overlays/petra-cluster":
            svc = r.get("Service", "petra-public")
            if report.check(svc is not None and dig(svc, "spec", "type") == "LoadBalancer", r.name,
                            "Petra needs a LoadBalancer Service petra-public"):
                annotation = dig(svc, "metadata", "annotations", "external-dns.alpha.kubernetes.io/hostname")
                report.check(annotation == host, r.name, f"petra-public's DNS name is {annotation}, not {host}")
                report.check(443 in [p["port"] for p in svc["spec"]["ports"]], r.name,
                             "petra-public must listen on 443 (PETRA_URL carries no port)")
            cert = r.get("Certificate", "petra")
            if cert is not None:
                report.check(host in dig(cert, "spec", "dnsNames"), r.name, f"Certificate petra lacks SAN {host}")
            secret = r.get("Secret", "petra-tls")
            if secret is not None:
                sans = cert_sans(secret["data"]["tls.crt"])
                report.check(host in sans, r.name, f"petra-tls certificate lacks SAN {host}: {sorted(sans)}")
            report.check(r.get("Deployment", "klaus") is None and r.get("Certificate", "klaus") is None, r.name,
                         "Klaus or its certificate leaked into Petra's cluster")
        if r.overlay == "overlays/klaus-cluster":
            report.check(r.get("Deployment", "petra") is None and r.get("Certificate", "petra") is None, r.name,
                         "Petra or its certificate leaked into Klaus's cluster")


# ----------------------------------------------------------------------------------------------
# Step 5: the binaries' contract, docker-compose


def contract_env(contract: dict) -> dict[str, dict]:
    return {e["name"]: e for e in contract["env"]}


def env_value(container: dict, contract: dict, name: str) -> str | None:
    e = env_map(container).get(name)
    if e is not None and "value" in e:
        return e["value"]
    return contract_env(contract).get(name, {}).get("default")


def check_contract(report: Report, r: Render, contracts: dict) -> None:
    for wl in r.of_kind("Deployment"):
        name = dig(wl, "metadata", "name")
        contract = contracts.get(name)
        where = f"{r.name}: Deployment/{name}"
        if not report.check(contract is not None, where, "no contract for this service"):
            continue
        spec = pod_spec(wl)
        c = next((c for c in spec["containers"] if c["name"] == name), None)
        if not report.check(c is not None, where, f"no container named {name}"):
            continue
        main, admin = contract["ports"]["main"], contract["ports"]["admin"]
        paths = contract["paths"]
        known = contract_env(contract)
        ports = {p["containerPort"] for p in c.get("ports") or []}
        report.check(ports == {main, admin}, where, f"containerPorts {sorted(ports)}, binary serves {[main, admin]}")
        report.check(resolve_port(wl, "admin") == admin, where, f"port `admin` must be {admin}")
        for var in env_map(c):
            report.check(var in known, where, f"env {var} is not read by {name} (contract)")
        for var, spec_ in known.items():
            if spec_.get("required"):
                report.check(var in env_map(c), where, f"env {var} is required by {name}")
        check_error_detail(report, where, env_value(c, contract, ERROR_DETAIL))
        report.check(addr_port(env_value(c, contract, "LISTEN_ADDR")) == main, where, f"LISTEN_ADDR must use {main}")
        report.check(addr_port(env_value(c, contract, "ADMIN_ADDR")) == admin, where, f"ADMIN_ADDR must use {admin}")
        for probe, path in [("livenessProbe", paths["livez"]), ("startupProbe", paths["livez"]),
                            ("readinessProbe", paths["readyz"])]:
            get = dig(c, probe, "httpGet")
            if report.check(get is not None, where, f"{probe} must be an httpGet"):
                report.check(get.get("path") == path, where, f"{probe} path {get.get('path')}, binary serves {path}")
                report.check(resolve_port(wl, get.get("port")) == admin, where,
                             f"{probe} must use the admin port {admin}")
                report.check(get.get("scheme", "HTTP") == "HTTP", where, f"{probe}: the admin port is plain HTTP")
        annotations = dig(wl, "spec", "template", "metadata", "annotations", default={})
        if "prometheus.io/scrape" in annotations:
            report.check(annotations.get("prometheus.io/port") == str(admin), where, "prometheus.io/port")
            report.check(annotations.get("prometheus.io/path") == paths["metrics"], where, "prometheus.io/path")
        delay = int(env_value(c, contract, "SHUTDOWN_DELAY_SECONDS") or 0)
        drain = int(env_value(c, contract, "SHUTDOWN_TIMEOUT_SECONDS") or 0)
        grace = spec.get("terminationGracePeriodSeconds", 30)
        report.check(grace > delay + drain, where,
                     f"terminationGracePeriodSeconds {grace} must exceed shutdown delay + drain ({delay} + {drain})")
        mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts") or []}
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        secrets = produced_secrets(r)
        for var, e in env_map(c).items():
            if not FILE_VARS.match(var) or "value" not in e:
                continue
            folder, _, file = e["value"].rpartition("/")
            mount = mounts.get(folder)
            if not report.check(mount is not None, where, f"{var}={e['value']}: nothing is mounted at {folder}"):
                continue
            secret = dig(volumes.get(mount["name"]), "secret", "secretName")
            if report.check(secret is not None, where, f"{var}: {folder} is not a Secret volume") and \
                    r.overlay.startswith("overlays/"):
                # A base leaves the Secrets to the overlays.
                report.check(file in secrets.get(secret, set()), where, f"{var}: Secret {secret} has no key {file}")


ERROR_DETAIL = "ERROR_DETAIL"


def check_error_detail(report: Report, where: str, value: str | None) -> None:
    # Klaus's error answers name internal hosts, ports and settings only with ERROR_DETAIL=verbose,
    # which is for a developer's machine: no deployed service may set it.
    if value is not None:
        report.check(value == "public", where, f"{ERROR_DETAIL}={value}: error answers must stay public")


def compose_env(service: dict) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {item.split("=", 1)[0]: (item.split("=", 1)[1] if "=" in item else None) for item in env}
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def compose_container_ports(service: dict) -> set[int]:
    out = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    for p in service.get("expose") or []:
        out.add(int(str(p).split("/")[0]))
    return out


def check_compose(report: Report, root: Path, renders: list[Render], contracts: dict) -> int:
    files = sorted(root.glob("docker-compose*.yml")) + sorted(root.glob("docker-compose*.yaml"))
    k8s_images = {c["name"]: c["image"] for r in renders for wl in r.of_kind("Deployment")
                  for c in pod_spec(wl)["containers"]}
    k8s_uids = {dig(wl, "metadata", "name"): dig(pod_spec(wl), "securityContext", "runAsUser")
                for r in renders for wl in r.of_kind("Deployment")}
    for path in files:
        doc = load_yaml(path) or {}
        for key, service in (doc.get("services") or {}).items():
            image = service.get("image") or ""
            # The service is known by its image (petra:dev) or, failing that, by its key.
            name = image_repo(image) if image_repo(image) in contracts else key
            if name not in contracts:
                continue
            contract = contracts[name]
            where = f"{path.name}: service {key}"
            command = service.get("command") or []
            if isinstance(command, str):
                command = command.split()
            if command and command[0] in ("certs", "healthcheck", "contract"):
                continue  # a one-shot job of the same image, not the server
            # A service with neither image nor build only overrides a few keys of another file.
            complete = "image" in service or "build" in service
            main, admin = contract["ports"]["main"], contract["ports"]["admin"]
            env = compose_env(service)
            known = contract_env(contract)
            for var in env:
                report.check(var in known, where, f"env {var} is not read by {name} (contract)")
            for var, spec_ in known.items():
                if spec_.get("required") and complete:
                    report.check(var in env, where, f"env {var} is required by {name}")
            if ERROR_DETAIL in known:
                check_error_detail(report, where, env.get(ERROR_DETAIL) or known[ERROR_DETAIL].get("default"))
            user = str(service.get("user") or "")
            if user and k8s_uids.get(name) is not None:
                report.check(user.split(":")[0] == str(k8s_uids[name]), where,
                             f"user {user}, Kubernetes runs {name} as uid {k8s_uids[name]}")
            for var, port in [("LISTEN_ADDR", main), ("ADMIN_ADDR", admin)]:
                value = env.get(var) or known.get(var, {}).get("default")
                if value and "${" not in value:
                    report.check(addr_port(value) == port, where, f"{var}={value}, Kubernetes and the binary use {port}")
            ports = compose_container_ports(service)
            report.check(ports <= {main, admin}, where, f"container ports {sorted(ports)} are not {[main, admin]}")
            k8s_image = k8s_images.get(name)
            if image and k8s_image:
                report.check(image_repo(image) == image_repo(k8s_image), where,
                             f"image {image} is not the one Kubernetes runs ({k8s_image})")
    return len(files)


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# Self-test: every check must be able to fail. Each entry breaks one thing in a copy of a real
# render (or a sample compose file) and names the failure the check meant for it must report.


def _obj(r: Render, kind: str, name: str) -> dict:
    doc = r.get(kind, name)
    if doc is None:
        raise LookupError(f"{r.name} has no {kind}/{name}")
    return doc


def _ctr(r: Render, name: str) -> dict:
    return pod_spec(_obj(r, "Deployment", name))["containers"][0]


def _drop(r: Render, kind: str, name: str) -> None:
    r.docs.remove(_obj(r, kind, name))


def _env(r: Render, name: str, var: str, value: str) -> None:
    env = _ctr(r, name)["env"]
    env[:] = [e for e in env if e["name"] != var] + [{"name": var, "value": value}]


def _set_url(r: Render, url: str) -> None:
    ref = dig(env_map(_ctr(r, "klaus"))["PETRA_URL"], "valueFrom", "configMapKeyRef")
    _obj(r, "ConfigMap", ref["name"])["data"][ref["key"]] = url


def _rename_petra_service(r: Render, name: str) -> None:
    """Petra's Service under another name, and Klaus's URL following it."""
    _obj(r, "Service", "petra")["metadata"]["name"] = name
    _set_url(r, f"https://{name}.{r.namespace}.svc.cluster.local:8443")


def _admin_rule(r: Render) -> dict:
    return _obj(r, "NetworkPolicy", "allow-admin-from-monitoring")["spec"]["ingress"][0]


def _petra_block(r: Render) -> dict:
    """The ipBlock of Klaus's egress to Petra's external address range."""
    return _obj(r, "NetworkPolicy", "klaus-allow-egress-to-petra-external")["spec"]["egress"][0]["to"][0]["ipBlock"]


LOCAL = "https://petra.petra-klaus.svc.cluster.local:8443"  # Klaus's URL of its own cluster's Petra


MUTATIONS = [
    ("single-cluster", "strict schema", lambda r: _ctr(r, "petra").update(imagePullPolicyy="Always")),
    ("single-cluster+cert-manager", "CRD schema",
     lambda r: _obj(r, "Certificate", "petra")["spec"]["usages"].append("server-auth")),
    ("single-cluster+gateway-api", "CRD schema",
     lambda r: _obj(r, "HTTPRoute", "klaus")["spec"]["rules"][0]["backendRefs"][0].pop("port")),
    ("single-cluster", "pod securityContext.runAsUser must be 65532",
     lambda r: pod_spec(_obj(r, "Deployment", "petra"))["securityContext"].update(runAsUser=0)),
    ("single-cluster", "allowPrivilegeEscalation must be false",
     lambda r: _ctr(r, "klaus")["securityContext"].update(allowPrivilegeEscalation=True)),
    ("single-cluster", "capabilities.drop must hold ALL",
     lambda r: _ctr(r, "petra")["securityContext"]["capabilities"].update(drop=[])),
    ("single-cluster", "readOnlyRootFilesystem must be true",
     lambda r: _ctr(r, "petra")["securityContext"].update(readOnlyRootFilesystem=False)),
    ("single-cluster", "seccompProfile.type must be RuntimeDefault",
     lambda r: pod_spec(_obj(r, "Deployment", "klaus"))["securityContext"].pop("seccompProfile")),
    ("single-cluster", "resources.limits.memory missing",
     lambda r: _ctr(r, "klaus")["resources"]["limits"].pop("memory")),
    ("single-cluster", "readinessProbe must be an httpGet", lambda r: _ctr(r, "petra").pop("readinessProbe")),
    ("single-cluster", "needs a version tag", lambda r: _ctr(r, "klaus").update(image="klaus:latest")),
    ("single-cluster", "provider-specific text", lambda r: _obj(r, "Service", "klaus")["metadata"].update(
        annotations={"service.beta.kubernetes.io/aws-load-balancer-scheme": "internal"})),
    ("single-cluster", "provider-specific", lambda r: _obj(r, "Service", "klaus")["spec"].update(
        loadBalancerClass="example.com/lb")),
    ("single-cluster", "must exceed shutdown delay",
     lambda r: pod_spec(_obj(r, "Deployment", "petra")).update(terminationGracePeriodSeconds=25)),
    ("single-cluster", "must exceed shutdown delay", lambda r: _env(r, "klaus", "SHUTDOWN_TIMEOUT_SECONDS", "40")),
    ("single-cluster", "containerPorts", lambda r: _ctr(r, "petra")["ports"][0].update(containerPort=8444)),
    ("single-cluster", "LISTEN_ADDR must use", lambda r: _env(r, "klaus", "LISTEN_ADDR", "0.0.0.0:8081")),
    ("single-cluster", "is not read by", lambda r: _env(r, "petra", "LISTEN_PORT", "8443")),
    ("single-cluster", "error answers must stay public", lambda r: _env(r, "klaus", "ERROR_DETAIL", "verbose")),
    ("single-cluster", "is required by", lambda r: _ctr(r, "klaus").update(
        env=[e for e in _ctr(r, "klaus")["env"] if e["name"] != "PETRA_URL"])),
    ("single-cluster", "livenessProbe path", lambda r: _ctr(r, "klaus")["livenessProbe"]["httpGet"].update(
        path="/healthz")),
    ("single-cluster", "startupProbe must use the admin port",
     lambda r: _ctr(r, "petra")["startupProbe"]["httpGet"].update(port="https")),
    ("single-cluster", "no default-deny policy", lambda r: _drop(r, "NetworkPolicy", "default-deny-all")),
    ("single-cluster", "DNS (UDP 53) egress blocked", lambda r: _drop(r, "NetworkPolicy", "allow-dns-egress")),
    ("single-cluster", "Klaus may not connect to Petra",
     lambda r: _drop(r, "NetworkPolicy", "klaus-allow-egress-to-petra")),
    ("single-cluster", "open to any pod, not only Klaus",
     lambda r: _obj(r, "NetworkPolicy", "petra-allow-ingress")["spec"]["ingress"][0].pop("from")),
    # The admin port: from the labelled monitoring namespace only; kubelet probes need no rule.
    ("single-cluster", "admits every source on the admin port",
     lambda r: _obj(r, "NetworkPolicy", "allow-admin-from-monitoring")["spec"]["ingress"][0].pop("from")),
    ("single-cluster", "admits every source on the admin port", lambda r: _obj(r, "NetworkPolicy",
     "klaus-allow-ingress")["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 9090})),
    ("single-cluster", "admin port 9090 open to pods of any namespace",
     lambda r: _admin_rule(r)["from"][0].update(namespaceSelector={})),
    ("single-cluster", "admin port 9090 open to other pods of its namespace",
     lambda r: _admin_rule(r)["from"].append({"podSelector": {}})),
    ("single-cluster", "admin port 9090 open to outside addresses",
     lambda r: _admin_rule(r)["from"].append({"ipBlock": {"cidr": "203.0.113.0/24"}})),
    ("single-cluster", "admin port 9090 closed to Prometheus",
     lambda r: _drop(r, "NetworkPolicy", "allow-admin-from-monitoring")),
    ("single-cluster+aws", "closed to the load balancers' health checks",
     lambda r: _drop(r, "NetworkPolicy", "allow-admin-from-load-balancer")),
    ("single-cluster+aws", "ingress to every address",
     lambda r: _obj(r, "NetworkPolicy", "allow-admin-from-load-balancer")["spec"]["ingress"][0]["from"][0]
     ["ipBlock"].update(cidr="0.0.0.0/0")),
    # DNS: the cluster's DNS pods only, never any address on port 53.
    ("single-cluster", "DNS egress rule without a namespaceSelector",
     lambda r: _obj(r, "NetworkPolicy", "allow-dns-egress")["spec"]["egress"][0]["to"][0].pop("namespaceSelector")),
    ("single-cluster", "DNS (UDP 53) egress open to outside addresses",
     lambda r: _obj(r, "NetworkPolicy", "allow-dns-egress")["spec"]["egress"][0].pop("to")),
    ("single-cluster", "DNS (TCP 53) egress open to pods of any namespace",
     lambda r: _obj(r, "NetworkPolicy", "allow-dns-egress")["spec"]["egress"][0].update(
         to=[{"namespaceSelector": {}}])),
    ("single-cluster", "DNS (UDP 53) egress blocked (to the kube-dns",
     lambda r: _obj(r, "NetworkPolicy", "allow-dns-egress")["spec"]["egress"][0]["to"][0]["podSelector"]
     ["matchLabels"].update({"k8s-app": "coredns-typo"})),
    # Petra's external address: the one range set in petra-endpoint, never every address.
    ("klaus-cluster", "egress to every address", lambda r: _petra_block(r).update(cidr="0.0.0.0/0")),
    ("klaus-cluster-failover", "egress to every address",
     lambda r: _obj(r, "NetworkPolicy", "klaus-allow-egress-to-petra-external")["spec"]["egress"][0]["to"].append(
         {"ipBlock": {"cidr": "::/0"}})),
    ("klaus-cluster", "egress on 443 open to any address (198.51.100.7)",
     lambda r: _petra_block(r).update(cidr="192.0.0.0/2")),
    ("klaus-cluster", "without `to` opens egress to every address",
     lambda r: _obj(r, "NetworkPolicy", "klaus-allow-egress-to-petra-external")["spec"]["egress"][0].pop("to")),
    ("klaus-cluster", "is not an address range", lambda r: _petra_block(r).update(cidr="petra.example.com")),
    ("klaus-cluster", "unknown placeholder", lambda r: _petra_block(r).update(cidr="SET-ME")),
    ("klaus-cluster", "egress to petra.example.com:443 blocked",
     lambda r: _petra_block(r).update(cidr="198.51.100.0/24")),
    ("petra-cluster", "closed to outside addresses", lambda r: _drop(r, "NetworkPolicy", "petra-allow-external")),
    ("single-cluster", "names namespace other",
     lambda r: _set_url(r, "https://petra.other.svc.cluster.local:8443")),
    ("single-cluster", "must be https://", lambda r: _set_url(r, "http://petra:8443")),
    ("single-cluster", "is made by nothing", lambda r: pod_spec(_obj(r, "Deployment", "petra"))["volumes"][0]
     ["secret"].update(secretName="petra-tls-typo")),
    ("single-cluster", "targetPort httpx", lambda r: _obj(r, "Service", "petra")["spec"]["ports"][0].update(
        targetPort="httpx")),
    ("single-cluster", "maxUnavailable: 0", lambda r: _obj(r, "Deployment", "klaus")["spec"]["strategy"]
     ["rollingUpdate"].update(maxUnavailable=1)),
    ("single-cluster", "zone spread must be ScheduleAnyway", lambda r: pod_spec(_obj(r, "Deployment", "petra"))
     ["topologySpreadConstraints"][1].update(whenUnsatisfiable="DoNotSchedule")),
    ("single-cluster", "automountServiceAccountToken must be false",
     lambda r: _obj(r, "ServiceAccount", "klaus").update(automountServiceAccountToken=True)),
    ("single-cluster", "needs one HorizontalPodAutoscaler", lambda r: _drop(r, "HorizontalPodAutoscaler", "petra")),
    ("single-cluster", "PodDisruptionBudget", lambda r: _drop(r, "PodDisruptionBudget", "klaus")),
    ("single-cluster", "part-of", lambda r: _obj(r, "Service", "petra")["metadata"]["labels"].pop(
        "app.kubernetes.io/part-of")),
    ("single-cluster+ingress", "backend Service", lambda r: _obj(r, "Ingress", "klaus")["spec"]["rules"][0]
     ["http"]["paths"][0]["backend"]["service"].update(name="klaus-typo")),
    ("single-cluster+cert-manager", "Certificate petra has no SAN",
     lambda r: _obj(r, "Certificate", "petra")["spec"]["dnsNames"].remove("petra.petra-klaus.svc.cluster.local")),
    ("single-cluster+aws", "component aws adds no",
     lambda r: _obj(r, "Service", "klaus")["metadata"].pop("annotations")),
    ("klaus-cluster", "is not https://petra.example.com", lambda r: _set_url(r, "https://other.example.com")),
    ("petra-cluster", "lacks SAN", lambda r: _obj(r, "Secret", "petra-tls")["data"].update(
        {"tls.crt": _obj(r, "Secret", "petra-tls")["data"]["ca.crt"]})),
    ("petra-cluster+cert-manager", "leaked into Petra's cluster", lambda r: r.docs.append(
        copy.deepcopy(_obj(r, "Certificate", "petra")) | {"metadata": {"name": "klaus"}})),
    ("local", "must use the dev images", lambda r: _ctr(r, "petra").update(image="petra:0.1.0")),
    # Every Petra pod an endpoint of Klaus's: a headless Service, ready pods only, no port mapping,
    # a name in Petra's certificate.
    ("single-cluster", "is not headless", lambda r: _obj(r, "Service", "petra")["spec"].pop("clusterIP")),
    ("single-cluster", "publishes Petra pods that are not ready",
     lambda r: _obj(r, "Service", "petra")["spec"].update(publishNotReadyAddresses=True)),
    ("single-cluster", "maps no ports", lambda r: (_obj(r, "Service", "petra")["spec"]["ports"][0].update(port=443),
                                                  _set_url(r, "https://petra.petra-klaus.svc.cluster.local"))),
    ("single-cluster", "Secret petra-tls has no SAN petra-pods", lambda r: _rename_petra_service(r, "petra-pods")),
    ("single-cluster", "lists a URL twice", lambda r: _set_url(r, f"{LOCAL},{LOCAL}")),
    ("klaus-cluster", "must list 1 URL", lambda r: _set_url(r, f"{LOCAL},https://petra.example.com")),
    # The active-passive variant: the local Petra first, the other cluster's on failure.
    ("klaus-cluster-failover", "must come first", lambda r: _set_url(r, f"https://petra.example.com,{LOCAL}")),
    ("klaus-cluster-failover", "must start with this cluster's own Petra",
     lambda r: _set_url(r, "https://petra.example.com")),
    ("klaus-cluster-failover+cert-manager", "must run in Klaus's cluster too",
     lambda r: _drop(r, "Certificate", "petra")),
    ("klaus-cluster-failover", "is not https://petra.example.com",
     lambda r: _set_url(r, f"{LOCAL},https://petra.example.com:8443")),
    ("klaus-cluster-failover", "must be https://", lambda r: _set_url(r, f"{LOCAL},http://petra.example.com")),
    ("klaus-cluster-failover", "no Service petra-typo",
     lambda r: _set_url(r, "https://petra-typo.petra-klaus.svc.cluster.local:8443,https://petra.example.com")),
    ("klaus-cluster-failover", "egress to petra.example.com:443 blocked",
     lambda r: _drop(r, "NetworkPolicy", "klaus-allow-egress-to-petra-external")),
    ("klaus-cluster-failover", "Klaus may not connect to Petra",
     lambda r: _drop(r, "NetworkPolicy", "klaus-allow-egress-to-petra")),
    ("klaus-cluster-failover+cert-manager", "Certificate petra has no SAN",
     lambda r: _obj(r, "Certificate", "petra")["spec"]["dnsNames"].remove("petra.petra-klaus.svc.cluster.local")),
]

# A compose file as the compose topology might write it, broken once per entry.
COMPOSE_SAMPLE = {
    "services": {
        "certs": {"image": "petra:dev", "command": ["certs", "--out", "/certs"]},
        "petra": {"image": "petra:dev", "user": "65532:65532", "environment": {"LISTEN_ADDR": "0.0.0.0:8443"},
                  "expose": ["8443"]},
        "klaus": {"image": "klaus:dev", "environment": {"PETRA_URL": "https://petra:8443"}, "ports": ["8080:8080"]},
    }
}
COMPOSE_MUTATIONS = [
    ("LISTEN_ADDR=0.0.0.0:9443", lambda c: c["services"]["petra"]["environment"].update(LISTEN_ADDR="0.0.0.0:9443")),
    ("is not read by", lambda c: c["services"]["klaus"]["environment"].update(PETRA_ADDR="petra:8443")),
    ("is required by", lambda c: c["services"]["klaus"]["environment"].pop("PETRA_URL")),
    ("error answers must stay public", lambda c: c["services"]["klaus"]["environment"].update(ERROR_DETAIL="verbose")),
    ("container ports", lambda c: c["services"]["klaus"].update(ports=["8080:8081"])),
    ("is not the one Kubernetes runs", lambda c: c["services"]["petra"].update(image="petra-server:dev")),
    ("Kubernetes runs petra as uid", lambda c: c["services"]["petra"].update(user="1000:1000")),
]


def self_test(report: Report, renders: list[Render], contracts: dict, versions: list[str], schemas: Path,
              host: str, scratch: Path) -> int:
    by_name = {r.name: r for r in renders}
    caught = 0

    def run_all(r: Render, original: Render) -> Report:
        probe = Report()
        for step in ["schema", "policy", "contract"]:
            probe.step = step
            if step == "schema":
                # Only what the breakage changed: the rest passed above.
                seen = {json.dumps(d, sort_keys=True) for d in original.docs}
                changed = Render(r.name, r.overlay, r.components, "")
                changed.docs = [d for d in r.docs if json.dumps(d, sort_keys=True) not in seen]
                check_schemas(probe, [changed], versions[:1], schemas)
            elif step == "policy":
                check_images(probe, [r])
                check_two_clusters(probe, [r], host)
                check_policy(probe, r, contracts)
            else:
                check_contract(probe, r, contracts)
        return probe

    baseline: dict[str, Report] = {}
    for name, expected, mutate in MUTATIONS:
        original = by_name.get(name)
        if not report.check(original is not None, "self-test", f"no render {name} to break"):
            continue
        broken = Render(name, original.overlay, original.components, original.text)
        if name not in baseline:
            baseline[name] = run_all(broken, original)
        clean = baseline[name]
        mutate(broken)
        broken.text = yaml.safe_dump_all(broken.docs)
        # Only failures the breakage added count, so a real failure elsewhere does not mask it.
        new = [f for f in run_all(broken, original).failures if f not in clean.failures]
        hit = any(expected in f for f in new + clean.failures)
        caught += hit
        report.check(hit, f"self-test {name}", f"breaking it for {expected!r} was not caught; got: {new[:3]}")

    folder = scratch / "compose-self-test"
    folder.mkdir()
    (folder / "docker-compose.yml").write_text(yaml.safe_dump(COMPOSE_SAMPLE))
    clean = Report()
    check_compose(clean, folder, renders, contracts)
    report.check(not clean.failures, "self-test compose", f"the sample compose file fails: {clean.failures}")
    for expected, mutate in COMPOSE_MUTATIONS:
        sample = copy.deepcopy(COMPOSE_SAMPLE)
        mutate(sample)
        (folder / "docker-compose.yml").write_text(yaml.safe_dump(sample))
        probe = Report()
        check_compose(probe, folder, renders, contracts)
        hit = any(expected in f for f in probe.failures if f not in clean.failures)
        caught += hit
        report.check(hit, "self-test compose", f"breaking it for {expected!r} was not caught: {probe.failures}")
    return caught



def finish(report: Report) -> int:
    for failure in report.failures:
        print(f"FAIL {failure}")
    total = sum(report.passed.values())
    print(f"k8s: {total} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True, help="the workspace root")
    parser.add_argument("--out", type=Path, required=True, help="where renders and scratch files go")
    parser.add_argument("--versions", required=True, help="Kubernetes versions, comma-separated")
    parser.add_argument("--contract", action="append", required=True, help="SERVICE=FILE with `contract` JSON")
    parser.add_argument("certs_cmd", nargs=argparse.REMAINDER, help="-- the certs command (gets --out DIR ...)")
    args = parser.parse_args()
    args.certs_cmd = [a for a in args.certs_cmd if a != "--"]
    root = args.root.resolve()
    k8s = root / "k8s"
    here = Path(__file__).resolve().parent
    report = Report()
    contracts = {}
    for item in args.contract:
        service, _, path = item.partition("=")
        contracts[service] = json.loads(Path(path).read_text())
        report.check(contracts[service].get("service") == service, path, "contract names another service")

    scratch = Path(tempfile.mkdtemp(prefix="k8s-", dir=args.out))
    lap = [time.monotonic()]

    def took() -> str:
        """Seconds since the previous step ended."""
        now = time.monotonic()
        seconds, lap[0] = now - lap[0], now
        return f" ({seconds:.1f}s)"

    try:
        report.step = "certs"
        host = endpoint_host(k8s)
        certs = make_certs(args, report, scratch, host)
        scratch_k8s = scratch / "k8s"
        shutil.copytree(k8s, scratch_k8s, ignore=shutil.ignore_patterns("*.crt", "*.key", "*.pem"))
        for certs_dir in scratch_k8s.glob("overlays/*/certs"):
            for part in ["petra", "klaus"]:
                shutil.copytree(certs / part, certs_dir / part, dirs_exist_ok=True)
        print(f"certs: throwaway CA and certificates (extra SAN {host}) copied into "
              f"{len(list(scratch_k8s.glob('overlays/*/certs')))} overlays{took()}")

        report.step = "render"
        renders = render_all(args, report, k8s, scratch_k8s, args.out / "rendered")
        print(f"render: {len(renders)} builds (bases, overlays, overlay + component combinations) "
              f"-> {args.out / 'rendered'}{took()}")
        for r in renders:
            if r.overlay.startswith("overlays/"):
                print(f"  {r.name:<55} {len(r.docs):>3} objects")

        report.step = "schema"
        before = sum(report.passed.values())
        versions = [v.strip() for v in args.versions.split(",")]
        stats = check_schemas(report, renders, versions, here / "schemas")
        print(f"schema: {stats['documents']} documents ({stats['unique']} distinct): "
              f"{stats['k8s_validations']} validations against Kubernetes {', '.join(versions)} (strict), "
              f"{stats['crd_validations']} against CRD schemas ({sum(report.passed.values()) - before} passed){took()}")

        report.step = "policy"
        before = sum(report.passed.values())
        check_sources(report, root, k8s)
        check_images(report, renders)
        check_two_clusters(report, renders, host)
        for r in renders:
            check_policy(report, r, contracts)
        placeholders = sorted({block["cidr"] for r in renders for p in r.of_kind("NetworkPolicy")
                               for _, _, block in ip_blocks(p) if block["cidr"] in EXAMPLE_RANGES})
        for placeholder in placeholders:
            print(f"NOTE: {placeholder}: an address range users must set before `kubectl apply` (it refuses "
                  "the placeholder); checked with an example range")
        print(f"policy: {sum(report.passed.values()) - before} checks (restricted pod security, resources, "
              f"probes, images, labels, references, network reachability, provider-neutral, Klaus's Petra URLs, "
              f"two-cluster name)"
              f"{took()}")

        report.step = "contract"
        before = sum(report.passed.values())
        for r in renders:
            check_contract(report, r, contracts)
        n = check_compose(report, root, renders, contracts)
        print(f"contract: {sum(report.passed.values()) - before} checks against "
              f"{', '.join(sorted(contracts))} contract and {n} docker-compose file(s){took()}")

        report.step = "self-test"
        caught = self_test(report, renders, contracts, versions, here / "schemas", host, scratch)
        print(f"self-test: {caught} deliberate breakages, each caught by the check meant for it{took()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return finish(report)


if __name__ == "__main__":
    sys.exit(main())
