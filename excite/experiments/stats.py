"""What a sweep's runs say: per variant (a grid point without its seed) the mean and sample standard deviation
over seeds, and for each pair of variants that differ in one option the paired difference over their common
seeds with a Student's t interval. Pure functions of plain values (numpy and scipy).

A run here is a dict: ``run`` (its name), ``values`` (option -> value of the options that vary), ``seed``,
``finished``, ``best_val_acc`` and ``final_val_acc`` (fractions), optionally ``params``, ``epoch_seconds``,
``epochs_done`` and ``epochs``. Runs with the same seed trained on the same split in the same data order, so
the difference between two variants at one seed has the seed's luck taken out: pairing is what makes three
seeds enough to see a difference of a point.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

CONFIDENCE = 0.95
METRIC = "best_val_acc"  # what the comparisons compare: each run's best epoch's validation accuracy


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1; None for fewer than 2 values) of ``n`` values."""

    mean: float | None
    std: float | None
    n: int


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` paired differences with its two-sided ``confidence`` interval from Student's t with n-1
    degrees of freedom; ``low``, ``high`` (and ``std``) are None when n < 2, where no interval can be given."""

    mean: float | None
    std: float | None
    low: float | None
    high: float | None
    n: int
    confidence: float = CONFIDENCE


def mean_std(values: Iterable[float]) -> Spread:
    """The mean and sample standard deviation of ``values``."""
    array = np.asarray(list(values), dtype=float)
    if array.size == 0:
        return Spread(None, None, 0)
    return Spread(float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else None, int(array.size))


def paired_interval(differences: Iterable[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of ``differences`` (one per seed: variant A's result minus B's) and its t interval."""
    from scipy import stats  # scipy ships with scikit-learn, a dependency of excite

    array = np.asarray(list(differences), dtype=float)
    n = int(array.size)
    if n == 0:
        return Interval(None, None, None, None, 0, confidence)
    mean = float(array.mean())
    if n < 2:
        return Interval(mean, None, None, None, n, confidence)
    std = float(array.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n, confidence)


def show(value: Any) -> str:
    """A value as the summary writes it: ``[4,4,4]``, ``0.1``, ``se_resnet20_cifar``."""
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, tuple, dict)) else str(value)


def label(option: str, value: Any) -> str:
    """``se_resnet20_cifar`` for a model, ``growth_rate=24`` for any other option."""
    return show(value) if option == "model" else f"{option}={show(value)}"


def _key(values: dict[str, Any], options: Sequence[str]) -> str:
    return json.dumps([values.get(o) for o in options])


def variants(runs: Sequence[dict], options: Sequence[str]) -> list[dict]:
    """One entry per variant of the finished runs, in the order of their first run: its ``values`` and
    ``label``, the ``seeds`` it ran with, the spread of best and final validation accuracy over them (``best``,
    ``final``: mean, std, n), and the mean parameters and seconds per epoch where the runs record them."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run.get("finished"):
            groups.setdefault(_key(run["values"], options), []).append(run)
    found = []
    for group in groups.values():
        values = {o: group[0]["values"].get(o) for o in options}
        found.append({
            "label": "-".join(label(o, values[o]) for o in options) or "all runs",
            "values": values,
            "seeds": [run["seed"] for run in group],
            "best": asdict(mean_std(run["best_val_acc"] for run in group)),
            "final": asdict(mean_std(run["final_val_acc"] for run in group)),
            "params": _mean(run.get("params") for run in group),
            "epoch_seconds": _mean(run.get("epoch_seconds") for run in group),
        })
    return found


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(numbers)) if numbers else None


def comparisons(runs: Sequence[dict], axes: Sequence[tuple[str, Sequence[Any]]], metric: str = METRIC,
                confidence: float = CONFIDENCE) -> list[dict]:
    """For every pair of variants that differ in exactly one option (everything else equal), the paired
    difference of ``metric`` over their common seeds: the later value of that option in ``axes`` (option, values
    in the order given) minus the earlier, e.g. se_resnet20_cifar minus resnet20_cifar. Each entry has the option,
    both labels, the other options' values (``context``), the seeds, the Interval's fields and a ``sentence``."""
    options = [name for name, _ in axes]
    order = {name: [json.dumps(v) for v in values] for name, values in axes}
    by_variant: dict[str, dict[int, float]] = {}
    values_of: dict[str, dict[str, Any]] = {}
    for run in runs:
        if run.get("finished"):
            key = _key(run["values"], options)
            by_variant.setdefault(key, {})[run["seed"]] = run[metric]
            values_of[key] = run["values"]
    found = []
    for option in options:
        others = [o for o in options if o != option]
        for a_key, a in values_of.items():
            for b_key, b in values_of.items():
                if any(a.get(o) != b.get(o) for o in others):
                    continue
                a_rank, b_rank = (order[option].index(json.dumps(v.get(option))) for v in (a, b))
                if a_rank <= b_rank:  # each pair once, the later value first
                    continue
                seeds = sorted(set(by_variant[a_key]) & set(by_variant[b_key]))
                interval = paired_interval([by_variant[a_key][s] - by_variant[b_key][s] for s in seeds], confidence)
                entry = {"option": option, "a": label(option, a.get(option)), "b": label(option, b.get(option)),
                         "context": ", ".join(label(o, a.get(o)) for o in others), "seeds": seeds, "metric": metric,
                         **asdict(interval)}
                entry["sentence"] = sentence(entry)
                found.append(entry)
    return found


def sentence(comparison: dict) -> str:
    """The plain answer, in percentage points: "se_resnet20_cifar vs resnet20_cifar: +0.8 points (95% CI -0.3 to
    +1.9, 3 seeds): the data do not show a difference", or "...: se_resnet20_cifar is better"."""
    a, b, n = comparison["a"], comparison["b"], comparison["n"]
    context = f" ({comparison['context']})" if comparison.get("context") else ""
    head = f"{a} vs {b}{context}"
    if n == 0:
        return f"{head}: no seed finished for both, so there is nothing to compare yet"
    mean = 100 * comparison["mean"]
    seeds = f"{n} seed" + ("s" if n > 1 else "")
    if n < 2:
        return f"{head}: {mean:+.1f} points ({seeds}): no interval can be given with fewer than 2 common seeds"
    low, high = 100 * comparison["low"], 100 * comparison["high"]
    ci = f"{comparison.get('confidence', CONFIDENCE):.0%} CI {low:+.1f} to {high:+.1f}"
    verdict = (f"{a} is better" if comparison["low"] > 0 else f"{b} is better" if comparison["high"] < 0
               else "the data do not show a difference")
    return f"{head}: {mean:+.1f} points ({ci}, {seeds}): {verdict}"


def summarize(runs: Sequence[dict], axes: Sequence[tuple[str, Sequence[Any]]], compare: bool = True) -> dict:
    """Everything a sweep's summary holds: its runs, the variants and (with ``compare``) the comparisons."""
    options = [name for name, _ in axes]
    return {
        "metric": METRIC, "confidence": CONFIDENCE, "options": options,
        "runs": list(runs),
        "variants": variants(runs, options),
        "comparisons": comparisons(runs, axes) if compare else [],
        "unfinished": [run["run"] for run in runs if not run.get("finished")],
    }


def _percent(spread: dict) -> str:
    if spread["mean"] is None:
        return "-"
    return f"{100 * spread['mean']:.1f}" + (f" ± {100 * spread['std']:.1f}" if spread["std"] is not None else "")


def _params(count: float | None) -> str:
    if count is None:
        return "-"
    return f"{count / 1e6:.2f}M" if count >= 1e6 else f"{count / 1e3:.1f}K"


def _table_rows(summary: dict) -> list[list[str]]:
    rows = [["variant", "seeds", "best val acc %", "final val acc %", "params", "s/epoch"]]
    for v in summary["variants"]:
        rows.append([v["label"], str(v["best"]["n"]), _percent(v["best"]), _percent(v["final"]), _params(v["params"]),
                     "-" if v["epoch_seconds"] is None else f"{v['epoch_seconds']:.1f}"])
    return rows


def _unfinished_lines(summary: dict) -> list[str]:
    lines = []
    for run in summary["runs"]:
        if not run.get("finished"):
            done = f"epoch {run['epochs_done']} of {run['epochs']}" if run.get("epochs") else "not started"
            lines.append(f"{run['run']}: {done}")
    return lines


def format_text(summary: dict, title: str = "") -> str:
    """The summary as the terminal shows it: the variants' table, then one sentence per comparison."""
    rows = _table_rows(summary)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    finished = len(summary["runs"]) - len(summary["unfinished"])
    lines = [f"{title}{finished} of {len(summary['runs'])} runs finished; mean ± sd over seeds"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    if summary["comparisons"]:
        lines += ["", "Paired differences in best validation accuracy over the seeds both ran (each seed: the same "
                      "split and data order):"]
        lines += [f"  {c['sentence']}" for c in summary["comparisons"]]
    if summary["unfinished"]:
        lines += ["", "Not finished (left out above):"] + [f"  {line}" for line in _unfinished_lines(summary)]
    return "\n".join(lines)


def format_markdown(summary: dict, title: str = "Sweep summary") -> str:
    """The summary as Markdown (summary.md)."""
    rows = _table_rows(summary)
    lines = [f"# {title}", "", "Best and final validation accuracy (%), mean ± sample sd over seeds.", "",
             "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    if summary["comparisons"]:
        lines += ["", "## Paired differences", "",
                  "Best validation accuracy, variant A minus B at each seed both ran (the same split and data order), "
                  f"with a {summary['confidence']:.0%} Student's t interval over those seeds. Each interval stands "
                  "alone: with many comparisons, expect about one in twenty to exclude 0 by chance.", ""]
        lines += [f"- {c['sentence']}" for c in summary["comparisons"]]
    if summary["unfinished"]:
        lines += ["", "## Not finished", ""] + [f"- {line}" for line in _unfinished_lines(summary)]
    return "\n".join(lines) + "\n"
