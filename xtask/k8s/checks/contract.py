"""The contract with the binaries: ports, probe paths, env var names and shutdown timing against what
`petra contract` and `klaus contract` report, in the renders and in docker-compose*.yml."""

from __future__ import annotations

import re
from pathlib import Path

from .objects import addr_port, dig, env_map, image_repo, load_yaml, pod_spec, produced_secrets, resolve_port
from .render import Render
from .report import Report


# Env vars that hold a path to one of the TLS files.
FILE_VARS = re.compile(r"^(TLS_.*_FILE|PETRA_.*_FILE)$")


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
