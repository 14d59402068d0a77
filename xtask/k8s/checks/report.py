"""Counts passed checks per step and collects failures; prints them and the closing line."""

from __future__ import annotations

from collections import Counter


class Report:
    """Counts checks per step and collects failures."""

    def __init__(self) -> None:
        self.passed: Counter[str] = Counter()
        self.failures: list[str] = []
        self.step = ""

    def check(self, ok: bool, where: str, message: str) -> bool:
        if ok:
            self.passed[self.step] += 1
        else:
            self.failures.append(f"[{self.step}] {where}: {message}")
        return ok

    def fail(self, where: str, message: str) -> None:
        self.check(False, where, message)


def finish(report: Report) -> int:
    for failure in report.failures:
        print(f"FAIL {failure}")
    total = sum(report.passed.values())
    print(f"k8s: {total} passed, {len(report.failures)} failed")
    return 1 if report.failures else 0
