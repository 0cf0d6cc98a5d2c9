"""Forgetting against learning for every row of a forgetting-bench results file, one panel per lr, with each
panel's Pareto front (no other row there forgets less and learns more) marked.

    python -m bench.forgetting_plot runs/forgetting-tiny/results.json --out docs/forgetting_pareto.png
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench.forgetting_compare import naive_of, ratio, with_naive


def points(results: dict[str, Any]) -> dict[str, list[tuple[float, float, str]]]:
    """{naive row: [(forgetting / naive, learning / naive, row), ...]} for every row with a naive to compare."""
    panels: dict[str, list[tuple[float, float, str]]] = {}
    for name in results["rows"]:
        naive = naive_of(results, name)
        if naive not in results["rows"]:
            continue
        forgot = ratio(*with_naive(results, name, "general"), +1)
        learned = ratio(*with_naive(results, name, "domain"), -1)
        if math.isfinite(forgot) and math.isfinite(learned):
            panels.setdefault(naive, []).append((forgot, learned, name))
    return panels


def pareto_front(panel: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """The rows no other row beats on both axes (less forgetting and more learning), by forgetting."""
    front = [p for p in panel if not any(q[0] <= p[0] and q[1] >= p[1] and q[:2] != p[:2] for q in panel)]
    return sorted(front)


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = points(results)
    order = sorted(panels, key=lambda n: results["definitions"][n]["lr_mult"])  # 1x, then 3x and 10x lr
    fig, axes = plt.subplots(1, len(order), figsize=(7 * len(order), 6), squeeze=False)
    for ax, naive in zip(axes[0], order):
        panel, front = panels[naive], pareto_front(panels[naive])
        ax.scatter([p[0] for p in panel], [p[1] for p in panel], color="tab:gray", s=18)
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", color="tab:red", label="Pareto front")
        for x, y, name in panel:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(naive.partition(", ")[2] or "1x lr")  # "naive CPT, 10x lr": "10x lr"
        ax.set_xlabel("forgetting / naive CPT's (general ppl rise)")
        ax.set_ylabel("learning / naive CPT's (domain ppl fall)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a bench.forgetting results.json")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args()
    results = json.loads(Path(args.results).read_text())
    plot(results, Path(args.out))
    for naive, panel in sorted(points(results).items()):
        front = ", ".join(f"{name} ({x:.2f} / {y:.2f})" for x, y, name in pareto_front(panel))
        print(f"{naive}: Pareto front (forgetting / learning): {front}")


if __name__ == "__main__":
    main()
