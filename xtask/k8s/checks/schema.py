"""Every rendered document against the official Kubernetes schemas (strict) or, for cert-manager and
Gateway API objects, against the CRD-derived schemas in xtask/k8s/schemas."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils

from .objects import dig
from .render import Render
from .report import Report

# kubernetes-validate reads and parses the (large) schema files on every call; the same few files
# serve every document here, so keep them.
if hasattr(kubernetes_validate.utils, "schema_contents"):
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
        kubernetes_validate.utils.schema_contents
    )


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
