"""Every policy check of one render, in one place: the checks and the self-test both run it."""

from __future__ import annotations

from .network import check_network, with_example_ranges
from .petra_url import check_klaus_to_petra
from .provider import check_provider_neutral
from .render import Render
from .report import Report
from .workloads import check_labels, check_references, check_workloads


def check_policy(report: Report, r: Render, contracts: dict) -> None:
    check_workloads(report, r)
    check_labels(report, r)
    check_provider_neutral(report, r)
    # A base leaves the Secrets and the namespace's policies to the overlays.
    if r.overlay.startswith("overlays/"):
        check_references(report, r)
        check_network(report, r, contracts)
        klaus = r.get("Deployment", "klaus")
        if klaus is not None and "klaus" in contracts:
            # Reachability with the example ranges a user would set in place of the placeholders.
            check_klaus_to_petra(report, with_example_ranges(r), klaus, r.get("Deployment", "petra"), contracts)
