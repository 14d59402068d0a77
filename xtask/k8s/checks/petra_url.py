"""Klaus's PETRA_URL: every URL leads somewhere Klaus may go and Petra's certificate names; and the
two-cluster topology's external name, set once, reaches every place that needs it."""

from __future__ import annotations

import base64
import functools
import re
import subprocess
from urllib.parse import urlsplit

from .network import ELSEWHERE, PETRA_LB, WORLD6, egress_allowed, ingress_allowed
from .objects import dig, env_map, labels_match, pod_labels, pod_spec, produced_secrets, resolve_port
from .render import Render
from .report import Report


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
