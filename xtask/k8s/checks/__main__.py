"""`python -m checks {render,check,compose}`: the command line of the package (see __init__.py)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import compose_secrets
from .contract import check_compose, check_contract
from .network import EXAMPLE_RANGES, ip_blocks
from .petra_url import check_two_clusters
from .policy import check_policy
from .provider import check_sources
from .render import endpoint_host, make_certs, render_all, render_command, scratch_copy, write
from .report import Report, finish
from .schema import check_schemas
from .selftest import self_test
from .workloads import check_images


def run_checks(args: argparse.Namespace) -> int:
    """`check`: renders with throwaway certificates, then every step; returns the exit code."""
    args.certs_cmd = [a for a in args.certs_cmd if a != "--"]
    root = args.root.resolve()
    k8s = root / "k8s"
    schemas = Path(__file__).resolve().parent.parent / "schemas"
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
        certs = make_certs(args.certs_cmd, root, report, scratch, host)
        scratch_k8s = scratch_copy(k8s, scratch, certs)
        print(f"certs: throwaway CA and certificates (extra SAN {host}) copied into "
              f"{len(list(scratch_k8s.glob('overlays/*/certs')))} overlays{took()}")

        report.step = "render"
        renders = render_all(report, k8s, scratch_k8s)
        write(renders, args.out / "rendered")
        print(f"render: {len(renders)} builds (bases, overlays, overlay + component combinations) "
              f"-> {args.out / 'rendered'}{took()}")
        for r in renders:
            if r.overlay.startswith("overlays/"):
                print(f"  {r.name:<55} {len(r.docs):>3} objects")

        report.step = "schema"
        before = sum(report.passed.values())
        versions = [v.strip() for v in args.versions.split(",")]
        stats = check_schemas(report, renders, versions, schemas)
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
        print(f"policy: {sum(report.passed.values()) - before} checks (restricted pod security as checkov leaves it, "
              f"replicas and spread, images, labels, references, network reachability, provider-neutral, Klaus's Petra URLs, "
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
        caught = self_test(report, root, renders, contracts, versions, schemas, host, scratch)
        print(f"self-test: {caught} deliberate breakages, each caught by the check meant for it{took()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return finish(report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="render, validate and check the manifests (cargo xtask k8s)")
    check.add_argument("--root", type=Path, required=True, help="the workspace root")
    check.add_argument("--out", type=Path, required=True, help="where renders and scratch files go")
    check.add_argument("--versions", required=True, help="Kubernetes versions, comma-separated")
    check.add_argument("--contract", action="append", required=True, help="SERVICE=FILE with `contract` JSON")
    check.add_argument("certs_cmd", nargs=argparse.REMAINDER, help="-- the certs command (gets --out DIR ...)")
    render = commands.add_parser("render", help="render what `check` checks into a folder (cargo xtask audit)")
    render.add_argument("--root", type=Path, required=True, help="the workspace root")
    render.add_argument("--out", type=Path, required=True, help="the folder to write (replaced)")
    render.add_argument("--distinct", action="store_true", help="write each document once, in its first render")
    render.add_argument("--checkov-cases", type=Path, help="also write the broken workloads of checkov_cases.py here")
    compose = commands.add_parser("compose", help="no compose service but the certs job sees the CA's key")
    compose.add_argument("--root", type=Path, required=True, help="the workspace root")
    args = parser.parse_args()
    if args.command == "check":
        return run_checks(args)
    if args.command == "render":
        return render_command(args.root.resolve(), args.out, args.distinct, args.checkov_cases)
    return compose_secrets.run(args.root.resolve())


if __name__ == "__main__":
    sys.exit(main())
