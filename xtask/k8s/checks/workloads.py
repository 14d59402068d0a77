"""Pods and the objects around them: Pod Security "restricted" as this project tightens it, replicas,
spread, disruption budgets, autoscalers, labels, references between objects, images.

checkov (`cargo xtask audit`) checks the same rendered output, so what it already enforces is not
repeated here: host namespaces and ports (CKV_K8S_17/18/19/26), privileged containers and privilege
escalation (CKV_K8S_16/20), dropped and added capabilities (CKV_K8S_37/25), read-only root file
systems (CKV_K8S_22), CPU and memory requests and limits (CKV_K8S_10-13), a fixed image tag or a
digest (CKV_K8S_14) and the pod's service account token (CKV_K8S_38). `checkov_cases.py` proves on
each audit that checkov still fails on each of them."""

from __future__ import annotations

from .objects import (TLS_KEYS, WORKLOAD_KINDS, containers, dig, image_repo, image_tag, labels_match, pod_labels,
                      pod_spec, produced_secrets, resolve_port)
from .render import Render
from .report import Report


# Pod Security Standards, "restricted" profile: the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}
UID = 65532


def check_pod_security(report: Report, where: str, spec: dict) -> None:
    """Pod Security Standards, restricted profile, where this project is stricter than checkov: the pod
    itself, not only its containers, runs as non-root user 65532 exactly (checkov's CKV_K8S_23/40 take any
    user from 10000, or a container-level setting) under seccomp RuntimeDefault (CKV_K8S_31 takes
    container-level profiles), with the restricted profile's volume types only (checkov has no such
    check); every container, init containers included, inherits or repeats those settings."""
    psc = spec.get("securityContext") or {}
    report.check(psc.get("runAsNonRoot") is True, where, "pod securityContext.runAsNonRoot must be true")
    report.check(psc.get("runAsUser") == UID, where, f"pod securityContext.runAsUser must be {UID}")
    report.check(dig(psc, "seccompProfile", "type") == "RuntimeDefault", where,
                 "pod securityContext.seccompProfile.type must be RuntimeDefault")
    for volume in spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        report.check(kinds <= RESTRICTED_VOLUMES, where, f"volume {volume['name']}: {kinds} not allowed")
    for c in containers(spec):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext") or {}
        report.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, cw, "runAsNonRoot")
        report.check(sc.get("runAsUser", psc.get("runAsUser")) == UID, cw, f"runAsUser must be {UID}")
        seccomp = dig(sc, "seccompProfile", "type") or dig(psc, "seccompProfile", "type")
        report.check(seccomp in ("RuntimeDefault", "Localhost"), cw, "seccompProfile")


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
