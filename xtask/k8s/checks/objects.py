"""Small helpers for reading rendered Kubernetes objects: paths into dicts, selectors, pod specs, images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from .render import Render


WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}


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


def resolve_port(workload: dict, port) -> int | None:
    for c in pod_spec(workload).get("containers") or []:
        for p in c.get("ports") or []:
            if port in (p.get("name"), p["containerPort"]):
                return p["containerPort"]
    return None


def produced_secrets(r: Render) -> dict[str, set[str]]:
    """Secret name -> keys, for Secrets in the render and those cert-manager will write."""
    out = {}
    for s in r.of_kind("Secret"):
        out[dig(s, "metadata", "name")] = set((s.get("data") or {}) | (s.get("stringData") or {}))
    for c in r.of_kind("Certificate"):
        out[dig(c, "spec", "secretName")] = set(TLS_KEYS)
    return out
