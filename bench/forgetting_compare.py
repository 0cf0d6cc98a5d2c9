"""The forgetting bench's arithmetic on stored results: perplexity changes, ratios to naive CPT, noise, and a
budget row against its lever's fixed weights at equal end rise or equal probe peak, paired per seed."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.forgetting_rows import Row, naive_name, without_weights


def metrics_file(work: Path, name: str, seed: int) -> Path:
    """Where a (row, seed) run's metrics.jsonl is kept after its run directory is removed."""
    return work / "metrics" / f"{name.replace(' ', '_').replace('/', '_')}-s{seed}.jsonl"


def probe_peak(work: Path, name: str, seed: int) -> float:
    """The highest probe rise a run logged (nan without a kept log or a probe)."""
    path = metrics_file(work, name, seed)
    if not path.is_file():
        return math.nan
    rises = [
        r["forgetting/probe_rise"]
        for r in map(json.loads, path.read_text().splitlines())
        if "forgetting/probe_rise" in r
    ]
    return max(rises, default=math.nan)


def changes(results: dict[str, Any], name: str, role: str, seeds: set[str] | None = None) -> list[float]:
    """The row's perplexity change against the base, per seed in seed order (only ``seeds`` where given)."""
    base = results["base"][f"ppl/{role}"]
    by_seed = sorted(results["rows"].get(name, {}).items(), key=lambda item: int(item[0]))  # seed order
    return [r[f"ppl/{role}"] / base - 1.0 for seed, r in by_seed if seeds is None or seed in seeds]


def shared_seeds(results: dict[str, Any], *names: str) -> set[str]:
    """The seeds every one of ``names`` ran: ratios pair a row with naive CPT seed by seed."""
    runs = [set(results["rows"].get(name, {})) for name in names]
    return set.intersection(*runs) if runs else set()


def naive_of(results: dict[str, Any], name: str) -> str:
    """The naive CPT row at ``name``'s lr in stored results ("" where there is none)."""
    return naive_name(results["definitions"], name) or ""


def with_naive(results: dict[str, Any], name: str, role: str) -> tuple[list[float], list[float]]:
    """The row's changes and naive CPT's (at the row's lr), on the seeds both ran, in seed order."""
    naive = naive_of(results, name)
    seeds = shared_seeds(results, name, naive)
    return changes(results, name, role, seeds), changes(results, naive, role, seeds)


def mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else math.nan) if xs else (math.nan, math.nan)


def beyond_noise(a: list[float], b: list[float]) -> bool:
    """|mean(a) − mean(b)| > 2 standard errors of the difference (each row's own seed spread)."""
    if len(a) < 2 or len(b) < 2:
        return False
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    return abs(statistics.fmean(a) - statistics.fmean(b)) > 2 * se


def ratio(row: list[float], naive: list[float], sign: float) -> float:
    """mean over seeds of the row's change over naive's (seed i with seed i); nan unless every naive seed moved
    the way ``sign`` says (+1: general ppl rose; -1: domain ppl fell): a share of no forgetting means nothing."""
    if not naive or len(row) != len(naive) or any(n * sign <= 0 for n in naive):
        return math.nan  # rows are paired in seed order, so they need the same seeds
    return statistics.fmean(r / n for r, n in zip(row, naive))


def on_line(points: list[tuple[float, float, str]], at: float) -> tuple[float, str, str] | None:
    """The learning on the line between the two sorted (x, learning, row name) points around ``at``, with their
    names; None outside them."""
    for (x0, l0, name0), (x1, l1, name1) in zip(points, points[1:]):
        if x0 <= at <= x1 and x1 > x0:
            return l0 + (l1 - l0) * (at - x0) / (x1 - x0), name0, name1
    return None


def end_rise(results: dict[str, Any], name: str, seed: str) -> float:
    """One seed's general ppl change on the holdout at the end of the run (nan where the run is missing)."""
    run = results["rows"].get(name, {}).get(seed)
    return run["ppl/general"] / results["base"]["ppl/general"] - 1.0 if run else math.nan


def learning(results: dict[str, Any], name: str, seed: str) -> float:
    """One seed's domain gain as a share of naive CPT's in the same seed (nan where either is missing)."""
    rows, base = results["rows"], results["base"]["ppl/domain"]
    run, naive = rows.get(name, {}).get(seed), rows.get(naive_of(results, name), {}).get(seed)
    if run is None or naive is None or naive["ppl/domain"] >= base:
        return math.nan
    return (run["ppl/domain"] / base - 1.0) / (naive["ppl/domain"] / base - 1.0)


def against_line(
    results: dict[str, Any], row: Row, fixed: list[Row], x: Callable[[str, str], float]
) -> tuple[list[float], list[str]]:
    """Per seed of ``row``: its learning minus that of the line between the two ``fixed`` rows around its
    ``x(name, seed)`` in the same seed (the same data order and replay samples, so seed noise shared by the
    rows cancels), and the seeds whose x fell outside their fixed rows' range; unmeasured points skipped."""
    differences, outside = [], []
    for seed in sorted(results["rows"].get(row.name, {}), key=int):
        at, learned = x(row.name, seed), learning(results, row.name, seed)
        if not (math.isfinite(at) and math.isfinite(learned)):
            continue
        measured = ((x(r.name, seed), learning(results, r.name, seed), r.name) for r in fixed)
        points = sorted(p for p in measured if math.isfinite(p[0]) and math.isfinite(p[1]))
        found = on_line(points, at)
        if found:
            differences.append(learned - found[0])
        elif len(points) >= 2:
            outside.append(f"seed {seed} at {at:+.1%}")
    return differences, outside


def paired(differences: list[float], outside: list[str]) -> str:
    """Mean ± std of per-seed differences, "~" when the mean is within two standard errors of 0, each, and the
    seeds left out for want of a bracket."""
    mean, std = mean_std(differences)
    noise = len(differences) > 1 and abs(mean) <= 2 * std / math.sqrt(len(differences))
    spread = f" ± {std:.3f}" if len(differences) > 1 else ""
    return (
        f"{mean:+.3f}{spread}{' ~' if noise else ''} of naive's gain (seeds compared: {len(differences)}; "
        f"each {', '.join(f'{d:+.3f}' for d in differences)}"
        + (f"; outside the fixed rows' range: {', '.join(outside)})" if outside else ")")
    )


def fixed_line(results: dict[str, Any], row: Row, rows: list[Row]) -> str | None:
    """For a budget row: its learning against the fixed weights of its lever at equal end rise on the holdout,
    per seed (:func:`against_line`): a comparison at equal forgetting, which the 5% line cannot give when the
    probe's documents read a point or two off the holdout's."""
    fixed = [
        other
        for other in rows
        if "forgetting" not in other.extra
        and (other.mixed, other.lr_mult, without_weights(other.extra))
        == (row.mixed, row.lr_mult, without_weights(row.extra))
    ]
    differences, outside = against_line(results, row, fixed, lambda name, seed: end_rise(results, name, seed))
    if differences:
        return f"{row.name}: at equal end rise, {paired(differences, outside)}"
    if outside:
        return f"{row.name}: outside its fixed rows' range ({', '.join(outside)})"
    return None


def peak_line(results: dict[str, Any], row: Row, rows: list[Row], work: Path) -> str | None:
    """For a budget row: its learning against the watched fixed weights of its lever at equal probe peak, per
    seed: a comparison on what a budget holds, the rise through the run, where :func:`fixed_line` compares end
    rises."""

    def key(r: Row) -> tuple[Any, ...]:  # the same lever and lr, probed as often (a max over more probes is higher)
        return r.mixed, r.lr_mult, without_weights(r.extra), r.extra["forgetting"].get("every")

    watched = [r for r in rows if r.watched and key(r) == key(row)]
    differences, outside = against_line(results, row, watched, lambda name, seed: probe_peak(work, name, int(seed)))
    return f"{row.name}: at equal probe peak, {paired(differences, outside)}" if differences else None
