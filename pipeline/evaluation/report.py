"""The run report: a markdown table (base vs tuned) and PNG plots of the training curves.

Plots, from ``metrics.jsonl``: each loss component, the learning rate,
general / domain holdout perplexity over training (from step 0, the base), and
the forgetting probe's rise when the run measured it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from cpt_core.atomic import write_json, write_text


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, dict[int, float]] = defaultdict(dict)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                series[k][row["step"]] = float(v)  # a resumed run's lines win
    return {k: sorted(v.items()) for k, v in series.items()}


def plot(run_dir: Path, out_dir: Path) -> list[Path]:
    import matplotlib  # optional to import until a plot is drawn; the backend must be set before pyplot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(run_dir)
    panels = [
        ("loss.png", "loss by component", [k for k in data if k.startswith("loss/")] or ["loss"], "log"),
        ("lr.png", "learning rate", ["lr"], "linear"),
        ("ppl.png", "holdout perplexity", [k for k in ("ppl/general", "ppl/domain") if k in data], "log"),
        (
            "forgetting.png",
            "general ppl rise on the probe (forgetting.budget or watch)",
            ["forgetting/probe_rise"],
            "linear",
        ),
    ]
    written = []
    for name, title, keys, scale in panels:
        keys = [k for k in keys if k in data]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
        for k in keys:
            xs, ys = zip(*data[k])
            ax.plot(xs, ys, marker="o" if len(xs) < 12 else None, label=k)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale(scale)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def write_report(
    run_dir: str | Path,
    result: dict[str, Any],
    title: str = "Forgetting report",
    out_dir: str | Path | None = None,
    about: dict[str, str] | None = None,
) -> Path:
    """``report.md``, ``eval.json`` and the plots of ``run_dir``'s curves, into ``out_dir`` (default: the run);
    ``about``: lines on the run (model, method, data) above the table."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    images = plot(run_dir, out_dir)
    head = [f"# {title}", ""] + ([f"- **{k}**: {v}" for k, v in about.items()] + [""] if about else [])
    body = head + [markdown_table(result), ""] + [f"![{p.stem}]({p.name})" for p in images]
    write_text(out_dir / "report.md", "\n".join(body) + "\n")
    write_json(out_dir / "eval.json", result)
    return out_dir / "report.md"


MODELS = ("base", "tuned")


def markdown_table(result: dict[str, Any]) -> str:
    drift = "replay_tm" in result["tuned"]  # measured against a GeRe cache only
    head = "| model | general ppl | domain ppl |" + (" replay TM | states moved |" if drift else "")
    lines = [head, "|---|---|---|" + ("---|---|" if drift else "")]
    for name in ("base", "tuned"):
        r = result.get(name)
        if r:
            line = f"| {name} | {r.get('ppl/general', math.nan):.2f} | {r.get('ppl/domain', math.nan):.2f} |"
            if drift:
                line += f" {r.get('replay_tm', math.nan):.4f} | {r.get('replay_state_flip_rate', math.nan):.2%} |"
            lines.append(line)
    files = sorted({k.rsplit("/", 1)[0] for k in result["tuned"] if k.startswith("mcq/")})
    if files:
        lines += ["", "| multiple choice | base acc | tuned acc | base acc_norm | tuned acc_norm |", "|" + "---|" * 5]
        for f in files:
            cells = [result.get(m, {}).get(f"{f}/{k}", math.nan) for k in ("acc", "acc_norm") for m in MODELS]
            lines.append(f"| {f.removeprefix('mcq/')} | " + " | ".join(f"{c:.1%}" for c in cells) + " |")
    if "not_reported" in result:
        lines += ["", f"ppl changes not reported: {result['not_reported']}"]
    changes = [
        f"{role} ppl change ({meaning}): {result[f'{role}_ppl_change']:+.1%}"
        + (f" ± {result[f'{role}_ppl_change_se']:.1%}" if f"{role}_ppl_change_se" in result else "")
        for role, meaning in (("general", "forgetting"), ("domain", "learning"))
        if f"{role}_ppl_change" in result
    ]
    if changes:
        lines += ["", "; ".join(changes)]
        if any(k.endswith("_ppl_change_se") for k in result):
            lines.append("±: standard error over the scored documents (other documents of these sources would read")
            lines.append("within it two times in three); it is not the spread between training runs")
    return "\n".join(lines)
