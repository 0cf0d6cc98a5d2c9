"""Reliability summary: every fault, bad-input and security case, run for real, tabulated.

The cases are the test suite's tests marked ``reliability(category)``: the
fast ones (bad input, damaged checkpoints, security, disk full, one kill per
kind, SIGTERM) also run in CI; the slow ones (``slow``: kill -9 of one training
rank at random steps or mid-save over 6 seeds, ``prepare`` killed at random
moments over 10 seeds) only here. Each case records how many items it lost
(good documents, earlier output files, checkpoint files, weight tensors that
differ from an uninterrupted run) before asserting that number is 0.

    python -m bench.reliability            # everything, ~7 min on 2 cores
    python -m bench.reliability --fast     # without the slow seeds (what CI runs)
Last line: reliability_cases=<n> passed=<n> data_lost=<n>
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.harness import finish, timed

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Case:
    category: str
    outcome: str = "not run"
    seconds: float = 0.0
    lost: int | None = None
    detail: str = ""
    properties: dict[str, Any] = field(default_factory=dict)


class Collector:
    """A pytest plugin that keeps each reliability case's category, outcome, time and recorded loss."""

    def __init__(self) -> None:
        self.cases: dict[str, Case] = {}

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:  # what -m and -k selected
            marker = item.get_closest_marker("reliability")
            if marker is not None:
                self.cases[item.nodeid] = Case(marker.args[0])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        case.seconds += report.duration
        props = dict(report.user_properties)
        case.properties.update(props)
        if "data_lost" in props:
            case.lost = int(props["data_lost"])
        if report.when == "call" or report.outcome != "passed":  # a setup or teardown failure counts too
            case.outcome = report.outcome
            if report.outcome == "failed":
                case.detail = str(report.longrepr).strip().splitlines()[-1][:160]


def summary_table(cases: dict[str, Case]) -> list[str]:
    by_category: dict[str, list[Case]] = defaultdict(list)
    for case in cases.values():
        by_category[case.category].append(case)
    lines = ["| category | cases | passed | data lost | seconds |", "|---|---:|---:|---:|---:|"]
    for category in sorted(by_category):
        group = by_category[category]
        lost = sum(c.lost or 0 for c in group)
        unrecorded = sum(c.lost is None for c in group)
        lines.append(
            f"| {category} | {len(group)} | {sum(c.outcome == 'passed' for c in group)} | {lost}"
            f"{f' ({unrecorded} not recorded)' if unrecorded else ''} | {sum(c.seconds for c in group):.0f} |"
        )
    total_lost = sum(c.lost or 0 for c in cases.values())
    lines.append(
        f"| **all** | {len(cases)} | {sum(c.outcome == 'passed' for c in cases.values())} | {total_lost} | "
        f"{sum(c.seconds for c in cases.values()):.0f} |"
    )
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fast", action="store_true", help="skip the slow randomised kills")
    p.add_argument("-k", dest="keyword", help="only cases whose test id matches (pytest -k)")
    args = p.parse_args()
    os.chdir(ROOT)
    collector = Collector()
    marker = "reliability and not slow" if args.fast else "reliability"
    pytest_args = ["-q", "-p", "no:cacheprovider", "-m", marker, "--no-header", "-rN", "tests"]
    if args.keyword:
        pytest_args += ["-k", args.keyword]
    elapsed, code = timed(lambda: pytest.main(pytest_args, plugins=[collector]))
    cases = collector.cases
    if not cases:
        print("no reliability cases were collected", file=sys.stderr)
        return 1

    print(
        f"\nReliability cases ({'fast only' if args.fast else 'all'}), run by pytest -m '{marker}' "
        f"in {elapsed:.0f} s; data lost = good documents, earlier output files, checkpoint files or weight "
        "tensors that did not survive\n"
    )
    print("\n".join(summary_table(cases)))
    kills = [(nodeid, c) for nodeid, c in cases.items() if "kill_point" in c.properties]
    if kills:
        print("\n| kill -9 of | seed | when | lost |\n|---|---:|---|---:|")
        for nodeid, c in kills:
            what = "training rank" if "rank" in nodeid.split("::")[-1] else "data prep"
            print(f"| {what} | {nodeid.rsplit('[', 1)[-1].rstrip(']')} | {c.properties['kill_point']} | {c.lost} |")
    failed = [(nodeid, c) for nodeid, c in cases.items() if c.outcome != "passed"]
    for nodeid, c in failed:
        print(f"FAILED {nodeid}: {c.detail}")
    passed = sum(c.outcome == "passed" for c in cases.values())
    lost = sum(c.lost or 0 for c in cases.values())
    finish("reliability", {"reliability_cases": len(cases), "passed": passed, "data_lost": lost})
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
