"""Self-test: every check must be able to fail. Each entry breaks one thing in a copy of a real
render (or a sample compose file, or a copy of the k8s/ tree) and names the failure the check meant
for it must report. Not broken here: the checks that report a tool's own failure (the certs tool
wrote no file, `kubectl kustomize` failed, a contract names another service), which fail the run
whenever they fire."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import yaml

from . import compose_secrets
from .contract import check_compose, check_contract
from .objects import dig, env_map, pod_spec
from .petra_url import check_two_clusters
from .policy import check_policy
from .provider import check_sources
from .render import Render, discover
from .report import Report
from .schema import check_schemas
from .workloads import check_images


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


def _pod_annotations(r: Render, name: str) -> dict:
    return _obj(r, "Deployment", name)["spec"]["template"]["metadata"]["annotations"]


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
    ("single-cluster", "pod securityContext.runAsNonRoot must be true",
     lambda r: pod_spec(_obj(r, "Deployment", "klaus"))["securityContext"].update(runAsNonRoot=False)),
    ("single-cluster", "container petra: runAsUser must be 65532",
     lambda r: _ctr(r, "petra").setdefault("securityContext", {}).update(runAsUser=10001)),
    ("single-cluster", "container petra: runAsNonRoot",
     lambda r: _ctr(r, "petra").setdefault("securityContext", {}).update(runAsNonRoot=False)),
    ("single-cluster", "container klaus: seccompProfile",
     lambda r: _ctr(r, "klaus").setdefault("securityContext", {}).update(seccompProfile={"type": "Unconfined"})),
    ("single-cluster", "{'hostPath'} not allowed", lambda r: pod_spec(_obj(r, "Deployment", "petra"))["volumes"].append(
        {"name": "host", "hostPath": {"path": "/"}})),
    ("single-cluster", "enableServiceLinks must be false",
     lambda r: pod_spec(_obj(r, "Deployment", "petra")).update(enableServiceLinks=True)),
    ("single-cluster", "needs at least 2 replicas", lambda r: _obj(r, "Deployment", "klaus")["spec"].update(replicas=1)),
    ("single-cluster", "HPA minReplicas must be >= 2",
     lambda r: _obj(r, "HorizontalPodAutoscaler", "petra")["spec"].update(minReplicas=1)),
    ("single-cluster", "pod securityContext.runAsUser must be 65532",
     lambda r: pod_spec(_obj(r, "Deployment", "petra"))["securityContext"].update(runAsUser=0)),
    ("single-cluster", "seccompProfile.type must be RuntimeDefault",
     lambda r: pod_spec(_obj(r, "Deployment", "klaus"))["securityContext"].pop("seccompProfile")),
    ("single-cluster", "readinessProbe must be an httpGet", lambda r: _ctr(r, "petra").pop("readinessProbe")),
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
    # The contract: names, ports, probes, annotations, the TLS files' mounts.
    ("single-cluster", "no container named petra", lambda r: _ctr(r, "petra").update(name="server")),
    ("single-cluster", "no contract for this service", lambda r: r.docs.append(
        copy.deepcopy(_obj(r, "Deployment", "klaus")) | {"metadata": {"name": "klaus-canary"}})),
    ("single-cluster", "port `admin` must be 9090", lambda r: _ctr(r, "petra")["ports"][1].update(name="metrics")),
    ("single-cluster", "ADMIN_ADDR must use", lambda r: _env(r, "klaus", "ADMIN_ADDR", "0.0.0.0:9091")),
    ("single-cluster", "the admin port is plain HTTP",
     lambda r: _ctr(r, "klaus")["readinessProbe"]["httpGet"].update(scheme="HTTPS")),
    ("single-cluster", "prometheus.io/port", lambda r: _pod_annotations(r, "petra").update(
        {"prometheus.io/port": "9091"})),
    ("single-cluster", "prometheus.io/path", lambda r: _pod_annotations(r, "klaus").update(
        {"prometheus.io/path": "/stats"})),
    ("single-cluster", "nothing is mounted at /etc/petra/tls",
     lambda r: _ctr(r, "petra")["volumeMounts"][0].update(mountPath="/etc/tls")),
    ("single-cluster", "is not a Secret volume", lambda r: pod_spec(_obj(r, "Deployment", "klaus"))["volumes"].__setitem__(
        0, {"name": "tls", "emptyDir": {}})),
    # Objects and the references between them.
    ("single-cluster", "ServiceAccount petra is not in the render", lambda r: _drop(r, "ServiceAccount", "petra")),
    ("single-cluster", "pod template needs app.kubernetes.io/name",
     lambda r: _obj(r, "Deployment", "klaus")["spec"]["template"]["metadata"]["labels"].update(
         {"app.kubernetes.io/name": "klaus-server"})),
    ("single-cluster", "topologySpreadConstraints: none over kubernetes.io/hostname",
     lambda r: pod_spec(_obj(r, "Deployment", "petra"))["topologySpreadConstraints"].pop(0)),
    ("single-cluster", "does not select its own pods",
     lambda r: pod_spec(_obj(r, "Deployment", "klaus"))["topologySpreadConstraints"][0]["labelSelector"].update(
         matchLabels={"app.kubernetes.io/name": "petra"})),
    ("single-cluster", "HPA must be autoscaling/v2",
     lambda r: _obj(r, "HorizontalPodAutoscaler", "petra").update(apiVersion="autoscaling/v1")),
    ("single-cluster", "scale target Deployment/klaus-typo missing",
     lambda r: _obj(r, "HorizontalPodAutoscaler", "klaus")["spec"]["scaleTargetRef"].update(name="klaus-typo")),
    ("single-cluster", "no Service selects these pods", lambda r: _drop(r, "Service", "klaus")),
    ("single-cluster", "selects no pods",
     lambda r: _obj(r, "Service", "klaus")["spec"]["selector"].update({"app.kubernetes.io/name": "klaus-typo"})),
    ("single-cluster", "does not select Petra's pods",
     lambda r: _obj(r, "Service", "petra")["spec"]["selector"].update({"app.kubernetes.io/name": "petra-typo"})),
    ("single-cluster", "label app.kubernetes.io/name missing",
     lambda r: _obj(r, "Service", "petra")["metadata"]["labels"].pop("app.kubernetes.io/name")),
    ("single-cluster", "keys must be", lambda r: _obj(r, "Secret", "klaus-tls")["data"].pop("ca.crt")),
    ("single-cluster", "has no key PETRA_URL_TYPO", lambda r: dig(env_map(_ctr(r, "klaus"))["PETRA_URL"], "valueFrom",
                                                                  "configMapKeyRef").update(key="PETRA_URL_TYPO")),
    ("single-cluster", "should be REGISTRY/petra:TAG", lambda r: _ctr(r, "petra").update(image="petra-server:0.1.0")),
    ("single-cluster+ingress", "backend port", lambda r: _obj(r, "Ingress", "klaus")["spec"]["rules"][0]["http"]
     ["paths"][0]["backend"]["service"].update(port={"number": 9999})),
    ("single-cluster+gateway-api", "backend Service klaus-typo missing", lambda r: _obj(r, "HTTPRoute", "klaus")
     ["spec"]["rules"][0]["backendRefs"][0].update(name="klaus-typo")),
    ("single-cluster+cert-manager", "Issuer petra-klaus-ca-typo missing", lambda r: [
        c["spec"]["issuerRef"].update(name="petra-klaus-ca-typo") for c in r.of_kind("Certificate")]),
    ("single-cluster+cert-manager", "CA Secret petra-klaus-ca-typo is made by nothing",
     lambda r: [i["spec"]["ca"].update(secretName="petra-klaus-ca-typo") for i in r.of_kind("Issuer")
                if "ca" in i["spec"]]),
    # Reachability that the rules above leave open.
    ("single-cluster", "egress to arbitrary ports is open", lambda r: _obj(r, "NetworkPolicy",
     "klaus-allow-egress-to-petra")["spec"]["egress"].append({"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}]})),
    ("single-cluster", "ingress to arbitrary ports is open", lambda r: _obj(r, "NetworkPolicy",
     "petra-allow-ingress")["spec"]["ingress"].append({"from": [{"podSelector": {}}]})),
    ("single-cluster", "Petra may open outbound connections", lambda r: r.docs.append({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "petra-egress", "labels": {"app.kubernetes.io/part-of": "petra-klaus"}},
        "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "petra"}}, "policyTypes": ["Egress"],
                 "egress": [{"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}], "ports": [{"port": 443}]}]}})),
    ("single-cluster", "Klaus's port 8080 closed to clients", lambda r: _drop(r, "NetworkPolicy", "klaus-allow-ingress")),
    ("single-cluster", "closed to ingress controllers and gateways", lambda r: _obj(r, "NetworkPolicy",
     "klaus-allow-ingress")["spec"]["ingress"][0].update(**{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]})),
    ("single-cluster", "Service petra has no port 8443",
     lambda r: _obj(r, "Service", "petra")["spec"]["ports"][0].update(port=8444)),
    ("single-cluster", "Petra does not accept Klaus", lambda r: _drop(r, "NetworkPolicy", "petra-allow-ingress")),
    # The two-cluster topology's name and objects.
    ("petra-cluster", "needs a LoadBalancer Service petra-public",
     lambda r: _obj(r, "Service", "petra-public")["spec"].update(type="ClusterIP")),
    ("petra-cluster", "DNS name is", lambda r: _obj(r, "Service", "petra-public")["metadata"]["annotations"].update(
        {"external-dns.alpha.kubernetes.io/hostname": "petra.example.org"})),
    ("petra-cluster", "must listen on 443", lambda r: _obj(r, "Service", "petra-public")["spec"]["ports"][0].update(
        port=8443)),
    ("petra-cluster+cert-manager", "Certificate petra lacks SAN petra.example.com",
     lambda r: _obj(r, "Certificate", "petra")["spec"]["dnsNames"].remove("petra.example.com")),
    ("klaus-cluster", "leaked into Klaus's cluster", lambda r: r.docs.append(
        copy.deepcopy(_obj(r, "Deployment", "klaus")) | {"metadata": {"name": "petra"}})),
]

# A compose file as the compose topology might write it, broken once per entry.
COMPOSE_SAMPLE = {
    "services": {
        "certs": {"image": "petra:dev", "command": ["certs", "--out", "/certs"],
                  "volumes": ["ca:/certs", "petra-certs:/certs/petra", "klaus-certs:/certs/klaus"]},
        "petra": {"image": "petra:dev", "user": "65532:65532", "environment": {"LISTEN_ADDR": "0.0.0.0:8443"},
                  "expose": ["8443"], "volumes": ["petra-certs:/certs/petra:ro"]},
        "klaus": {"image": "klaus:dev", "environment": {"PETRA_URL": "https://petra:8443"}, "ports": ["8080:8080"],
                  "volumes": ["klaus-certs:/certs/klaus:ro"]},
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
# A copy of the k8s/ source tree (in a git repository of its own), broken once per entry.
SOURCE_MUTATIONS = [
    ("provider-specific text 'EKS' in the base",
     lambda k8s: (k8s / "base" / "petra" / "notes.yaml").write_text("# tuned for EKS\n")),
    ("a key or certificate would be committed",
     lambda k8s: (k8s / "overlays" / "single-cluster" / "tls.crt").write_text("not a certificate\n")),
    ("a Secret in the source tree",
     lambda k8s: (k8s / "overlays" / "single-cluster" / "secret.yaml").write_text("kind: Secret\n")),
    ("not gitignored", lambda k8s: (k8s / ".gitignore").write_text("")),
]
# The same sample against compose_secrets: no service but the certs job sees the CA's key, each its own folder.
KEY_MOUNT_MUTATIONS = [
    ("which holds the CA's private key", lambda c: c["services"]["klaus"]["volumes"].append("ca:/ca:ro")),
    ("each service mounts only its own", lambda c: c["services"]["klaus"]["volumes"].append(
        "petra-certs:/certs/petra:ro")),
]


def self_test(report: Report, root: Path, renders: list[Render], contracts: dict, versions: list[str],
              schemas: Path, host: str, scratch: Path) -> int:
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

    compose_file = folder / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(COMPOSE_SAMPLE))
    clean_problems = compose_secrets.check(compose_file, set())
    report.check(not clean_problems, "self-test compose keys", f"the sample compose file fails: {clean_problems}")
    for expected, mutate in KEY_MOUNT_MUTATIONS:
        sample = copy.deepcopy(COMPOSE_SAMPLE)
        mutate(sample)
        compose_file.write_text(yaml.safe_dump(sample))
        problems = compose_secrets.check(compose_file, set())
        hit = any(expected in p for p in problems)
        caught += hit
        report.check(hit, "self-test compose keys", f"breaking it for {expected!r} was not caught: {problems}")

    for n, (expected, mutate) in enumerate([("", lambda k8s: None)] + SOURCE_MUTATIONS):
        copy_root = scratch / f"source-self-test-{n}"
        shutil.copytree(root / "k8s", copy_root / "k8s", ignore=shutil.ignore_patterns("*.crt", "*.key", "*.pem"))
        shutil.copy(root / ".gitignore", copy_root / ".gitignore")
        subprocess.run(["git", "init", "--quiet", str(copy_root)], check=True)
        mutate(copy_root / "k8s")
        probe = Report()
        check_sources(probe, copy_root, copy_root / "k8s")
        if not expected:
            report.check(not probe.failures, "self-test sources", f"the copy of k8s/ fails: {probe.failures[:3]}")
            continue
        hit = any(expected in f for f in probe.failures)
        caught += hit
        report.check(hit, "self-test sources", f"breaking it for {expected!r} was not caught: {probe.failures[:3]}")

    # A component nobody gave a place in the combinations, in the unbroken copy of k8s/.
    newcomer = scratch / "source-self-test-0" / "k8s" / "components" / "newcomer"
    newcomer.mkdir()
    (newcomer / "kustomization.yaml").write_text("kind: Component\n")
    probe = Report()
    discover(newcomer.parent.parent, probe)
    hit = any("unknown component" in f for f in probe.failures)
    caught += hit
    report.check(hit, "self-test components", f"a new component was not caught: {probe.failures[:3]}")
    return caught
