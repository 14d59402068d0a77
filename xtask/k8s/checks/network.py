"""NetworkPolicy reachability: which peers may reach which port of which pods, and what each rule may
say. checkov has nothing like it."""

from __future__ import annotations

import copy
import ipaddress

from .objects import dig, labels_match, pod_labels, resolve_port
from .render import Render
from .report import Report


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
