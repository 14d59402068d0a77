"""No long-running compose service can read the CA's private key, and each service mounts only its own
certificate folder (`python -m checks compose`, run by `cargo xtask k8s`).

For every `docker-compose*.yml` at the root, the one-shot `certs` job (a service whose command starts with
`certs`) tells where the files go: `--out DIR` holds ca.key, DIR/petra and DIR/klaus each service's key.
The volume that holds DIR/ca.key must be mounted by that job alone; a service running image `NAME:tag`
may mount, of the job's volumes, only the one at DIR/NAME. checkov has no compose framework.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import yaml


def mounts(service: dict) -> list[tuple[str, str]]:
    """(source, target) of each volume of a service, short or long syntax."""
    found = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, str):
            parts = volume.split(":")
            if len(parts) >= 2:
                found.append((parts[0], parts[1]))
        elif isinstance(volume, dict) and volume.get("source") and volume.get("target"):
            found.append((str(volume["source"]), str(volume["target"])))
    return found


def holder(path: PurePosixPath, service_mounts: list[tuple[str, str]]) -> str | None:
    """The source of the mount `path` lies in (the deepest one), if any."""
    best = None
    for source, target in service_mounts:
        target_path = PurePosixPath(target)
        if path == target_path or target_path in path.parents:
            if best is None or len(target_path.parts) > len(PurePosixPath(best[1]).parts):
                best = (source, target)
    return best[0] if best else None


def command_of(service: dict) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def check(path: Path, ca_sources: set[str]) -> list[str]:
    problems = []
    doc = yaml.safe_load(path.read_text()) or {}
    services = doc.get("services") or {}
    jobs = {}
    for name, service in services.items():
        command = command_of(service or {})
        if command[:1] == ["certs"]:
            out = command[command.index("--out") + 1] if "--out" in command else "certs"
            jobs[name] = PurePosixPath("/") / out
    # Of each job's volumes: the one with ca.key, and the one per service folder.
    per_service: dict[str, str] = {}
    for name, out in jobs.items():
        job_mounts = mounts(services[name])
        ca = holder(out / "ca.key", job_mounts)
        if ca:
            ca_sources.add(ca)
        for leaf in ["petra", "klaus"]:
            source = holder(out / leaf / "tls.key", job_mounts)
            if source and source != ca:
                per_service[leaf] = source
    for name, service in services.items():
        if name in jobs:
            continue
        image = str((service or {}).get("image", ""))
        own = image.split("/")[-1].split(":")[0]
        for source, target in mounts(service or {}):
            if source in ca_sources:
                problems.append(f"{path.name}: service `{name}` mounts `{source}` at {target}, which holds the "
                                f"CA's private key (ca.key); mount only its own folder's volume")
            for leaf, leaf_source in per_service.items():
                if source == leaf_source and leaf != own:
                    problems.append(f"{path.name}: service `{name}` ({image}) mounts `{source}`, {leaf}'s key "
                                    f"and certificate; each service mounts only its own")
    return problems


def run(root: Path) -> int:
    """Checks every docker-compose*.yml under `root`; prints one FAIL line per problem, returns the exit code."""
    files = sorted(root.glob("docker-compose*.yml"))
    if not files:
        print(f"FAIL no docker-compose*.yml under {root}")
        return 1
    ca_sources: set[str] = set()
    # Files with a certs job first, so that an override file (which has none) is checked against the CA
    # volumes the others define.
    files.sort(key=lambda f: "certs:" not in f.read_text())
    problems = [problem for f in files for problem in check(f, ca_sources)]
    if not ca_sources:
        problems.append("no compose file has a `certs` job writing ca.key into a volume; is the check still right?")
    for problem in problems:
        print(f"FAIL {problem}")
    if not problems:
        print(f"ok   {len(files)} compose files: ca.key only in the certs job's volume "
              f"({', '.join(sorted(ca_sources))}); each service mounts only its own certificates")
    return 1 if problems else 0

