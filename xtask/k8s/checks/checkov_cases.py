"""What checks.workloads leaves to checkov, broken once per case for `cargo xtask audit` to prove that
checkov (with the project's .checkov.yaml) still fails on each: the mutation self-test of the checks
that live in checkov rather than here."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .objects import pod_spec
from .render import Render


def _ctr(wl: dict) -> dict:
    return pod_spec(wl)["containers"][0]


def _sc(wl: dict) -> dict:
    return _ctr(wl).setdefault("securityContext", {})


# (checkov check id, what it is about, the Deployment of single-cluster to break, how).
CASES = [
    ("CKV_K8S_17", "hostPID", "petra", lambda wl: pod_spec(wl).update(hostPID=True)),
    ("CKV_K8S_18", "hostIPC", "petra", lambda wl: pod_spec(wl).update(hostIPC=True)),
    ("CKV_K8S_19", "hostNetwork", "klaus", lambda wl: pod_spec(wl).update(hostNetwork=True)),
    ("CKV_K8S_26", "hostPort", "petra", lambda wl: _ctr(wl)["ports"][0].update(hostPort=8443)),
    ("CKV_K8S_16", "privileged", "klaus", lambda wl: _sc(wl).update(privileged=True)),
    ("CKV_K8S_20", "allowPrivilegeEscalation", "klaus", lambda wl: _sc(wl).update(allowPrivilegeEscalation=True)),
    ("CKV_K8S_37", "capabilities.drop without ALL", "petra",
     lambda wl: _sc(wl).setdefault("capabilities", {}).update(drop=["NET_RAW"])),
    ("CKV_K8S_25", "capabilities.add", "petra",
     lambda wl: _sc(wl).setdefault("capabilities", {}).update(add=["NET_ADMIN"])),
    ("CKV_K8S_22", "readOnlyRootFilesystem", "petra", lambda wl: _sc(wl).update(readOnlyRootFilesystem=False)),
    ("CKV_K8S_10", "no CPU request", "klaus", lambda wl: _ctr(wl)["resources"]["requests"].pop("cpu")),
    ("CKV_K8S_11", "no CPU limit", "klaus", lambda wl: _ctr(wl)["resources"]["limits"].pop("cpu")),
    ("CKV_K8S_12", "no memory request", "petra", lambda wl: _ctr(wl)["resources"]["requests"].pop("memory")),
    ("CKV_K8S_13", "no memory limit", "klaus", lambda wl: _ctr(wl)["resources"]["limits"].pop("memory")),
    ("CKV_K8S_14", "image :latest", "klaus", lambda wl: _ctr(wl).update(image="klaus:latest")),
    ("CKV_K8S_14", "image without tag", "petra", lambda wl: _ctr(wl).update(image="petra")),
    ("CKV_K8S_38", "service account token", "petra", lambda wl: pod_spec(wl).update(automountServiceAccountToken=True)),
]


def write_cases(renders: list[Render], out: Path) -> int:
    """Writes one file per case, `ID.N.yaml`, holding the broken Deployment alone; returns the count."""
    base = next(r for r in renders if r.name == "single-cluster")
    out.mkdir(parents=True)
    for n, (check_id, _, name, mutate) in enumerate(CASES):
        wl = copy.deepcopy(base.get("Deployment", name))
        mutate(wl)
        (out / f"{check_id}.{n}.yaml").write_text(yaml.safe_dump(wl, sort_keys=False))
    return len(CASES)
