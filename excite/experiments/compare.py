"""``excite compare``: finished runs side by side — one table, overlaid curves and a self-contained HTML report.

:func:`compare_runs` reads each run directory that ``excite train`` wrote (``config.json``, ``metrics.jsonl``,
``model.json``, ``best_val.json`` and ``last.pt``'s recorded split), checks that the runs measure the same thing,
and writes into ``out``: ``comparison.csv`` (raw numbers), ``comparison.md``, ``curves.png`` (validation accuracy
and loss of every run), ``per_class.png``, ``accuracy_vs_cost.png``, one ``confusion-*.png`` per run and
``report.html`` holding all of them.

Comparable runs: an accuracy means something next to another only if both were validated on the same kind of
images. Runs are refused (one line naming two of them) when they were trained on different data (``data``), have
different classes, or were held out differently (``val_split``, ``val_dir``) — unless their recorded validation
images are the very same — and when two runs of the same seed recorded different validation images (the folder
changed between them). Runs that differ only in seed are compared: the split is seeded, so each validated on its
own draw of the same data, and the report says so. ``force=True`` compares anything and puts what differs at the
top of the report as a warning.

Older runs degrade gracefully: without ``model.json`` the model is built again to count its parameters and MACs,
without ``best_val.json`` the best epoch comes from ``metrics.jsonl`` and there is no confusion matrix, without a
recorded split the validation images are assumed from the data, ``val_split``, ``val_dir`` and seed; the report
says which runs were read that way.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, MaxNLocator

from excite.errors import CheckpointError, ExciteError
from excite.io import atomic_write, atomic_write_text
from excite.models.summary import format_count
from excite.report.html import Section, report_html

# The files that make a directory a run directory (written when a run starts).
RUN_FILES = ("config.json", "metrics.jsonl")
#: The columns of the table: key in a row of :attr:`Comparison.rows` -> title.
COLUMNS = {
    "name": "run", "model": "model", "arguments": "arguments", "seed": "seed", "params": "params", "macs": "MACs",
    "best_val_acc": "best val acc", "final_val_acc": "final val acc", "best_epoch": "best epoch",
    "train_seconds": "training time", "images_per_s": "img/s", "peak_memory_mib": "peak memory",
}
REFUSAL_HINT = "compare runs of the same data and split, or pass --force"


@dataclass
class Run:
    """What :func:`compare_runs` reads of one run directory (None where the run has no such file)."""

    path: Path
    name: str
    config: dict
    metrics: list[dict]
    model_info: dict | None = None  # model.json
    best_val: dict | None = None  # best_val.json
    classes: list[str] | None = None
    val_images: str | None = None  # a hash of the recorded validation image keys
    device: str | None = None  # of the last session, from environment.json
    notes: list[str] = field(default_factory=list)

    @property
    def seed(self) -> Any:
        return self.config.get("seed")


@dataclass
class Comparison:
    """The result of :func:`compare_runs`.

    ``rows`` holds one dict per run with the raw values of :data:`COLUMNS` and ``path`` and ``epochs`` (None
    where a run does not say); accuracies are fractions, times seconds, memory MiB. ``warnings`` are the
    differences ``force`` let through, ``notes`` what a reader should know (seeds, older runs). ``files`` maps
    each written file's name to its path.
    """

    runs: list[Run]
    rows: list[dict[str, Any]]
    warnings: list[str]
    notes: list[str]
    out: Path
    files: dict[str, Path]

    def table(self) -> list[dict[str, str]]:
        """The rows formatted for reading (1.23 M, 93.3%, 2 min 05 s), keyed by column title."""
        return [{title: _format(key, row.get(key)) for key, title in COLUMNS.items()} for row in self.rows]

    def format_table(self) -> str:
        """The table as aligned text for a terminal; numbers right-aligned."""
        titles = list(COLUMNS.values())
        cells = [[row[t] for t in titles] for row in self.table()]
        widths = [max(len(x) for x in [t, *(row[i] for row in cells)]) for i, t in enumerate(titles)]
        right = [i >= titles.index("seed") for i in range(len(titles))]
        line = lambda row: "  ".join(c.rjust(w) if r else c.ljust(w)  # noqa: E731
                                     for c, w, r in zip(row, widths, right)).rstrip()
        return "\n".join([line(titles), line(["-" * w for w in widths]), *map(line, cells)])


def find_runs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The run directories named by ``paths``: each is a run directory or a folder holding run directories at
    any depth (a sweep), expanded in name order. Duplicates are dropped; a path that holds no run is an error."""
    found: list[Path] = []
    for given in paths:
        path = Path(given).expanduser()
        if not path.is_dir():
            raise ExciteError(f"{given} is not a directory: give run directories (written by excite train) or "
                              "folders of them")
        if _is_run(path):
            found.append(path)
            continue
        inside = []
        for top, dirs, _ in os.walk(path):
            dirs.sort()
            if _is_run(Path(top)):
                inside.append(Path(top))
                dirs.clear()  # a run's own subfolders (eval outputs) are not runs
        if not inside:
            raise ExciteError(f"{given} holds no run directory (a folder with {' and '.join(RUN_FILES)}, written "
                              "by excite train)")
        found.extend(inside)
    runs, seen = [], set()
    for path in found:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            runs.append(path)
    return runs


def _is_run(path: Path) -> bool:
    return all((path / name).is_file() for name in RUN_FILES)


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
    """Read one run directory. A missing or unreadable ``config.json`` or a run without a finished epoch is an
    :class:`~excite.errors.ExciteError`; any other missing file only leaves its values unknown, with a note."""
    path = Path(path)
    name = name or path.resolve().name
    config = _read_json(path / "config.json")
    if not isinstance(config, dict) or "model" not in config:
        raise ExciteError(f"{path / 'config.json'} cannot be read as a run's config: give a run directory written "
                          "by excite train")
    metrics = _read_metrics(path / "metrics.jsonl")
    if not metrics:
        raise ExciteError(f"{path} has no finished epoch in metrics.jsonl: compare runs that trained at least one "
                          "epoch")
    run = Run(path=path, name=name, config=config, metrics=metrics)
    run.model_info = _read_json(path / "model.json", optional=True)
    run.best_val = _read_json(path / "best_val.json", optional=True)
    if run.best_val is None:
        run.notes.append(f"{name} has no best_val.json (trained by an older excite): no confusion matrix or "
                         "per-class accuracy, its best epoch taken from metrics.jsonl")
    sessions = _read_json(path / "environment.json", optional=True)
    if isinstance(sessions, list) and sessions and isinstance(sessions[-1], dict):
        run.device = sessions[-1].get("device")
    checkpoint = None
    try:
        from excite.train.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path / "last.pt")
    except CheckpointError as e:
        run.notes.append(f"{name}'s last.pt cannot be read ({e})")
    if run.best_val and isinstance(run.best_val.get("classes"), list):
        run.classes = list(run.best_val["classes"])
    elif checkpoint is not None:
        run.classes = list(checkpoint["classes"])
    split = checkpoint.get("split") if checkpoint is not None else None
    if isinstance(split, dict) and isinstance(split.get("val"), list):
        keys = "\n".join(sorted(map(str, split["val"])))
        run.val_images = hashlib.sha256(keys.encode()).hexdigest()
    else:
        run.notes.append(f"{name} records no split (trained by an older excite): its validation images are assumed "
                         "from its data, --val-split, --val-dir and seed")
    return run


def _read_json(path: Path, optional: bool = False) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if optional:
            return None
        raise ExciteError(f"{path} is missing: give a run directory written by excite train") from None
    except (OSError, ValueError) as e:
        if optional:
            return None
        raise ExciteError(f"{path} cannot be read ({e})") from None


def _read_metrics(path: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` that are JSON objects with an epoch (a damaged line is left out)."""
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("epoch"), int):
            rows.append(row)
    return rows


def check_comparable(runs: Sequence[Run], force: bool = False) -> tuple[list[str], list[str]]:
    """``(warnings, notes)`` about comparing ``runs``. Without ``force`` the first pair that must not be
    compared raises an :class:`~excite.errors.ExciteError` naming both; with it each such difference is a
    warning. Notes say where the validation images differ by seed, or the devices differ."""
    warnings = []
    for i, run in enumerate(runs):
        for earlier in runs[:i]:
            problem = _difference(earlier, run)
            if problem:
                line = f"runs {earlier.name} and {run.name} {problem}"
                if not force:
                    raise ExciteError(f"{line}: {REFUSAL_HINT}")
                warnings.append(line)
                break  # one line per run is enough to flag it
    notes = []
    seeds = sorted({run.seed for run in runs}, key=str)
    images = {run.val_images for run in runs}
    same_images = None not in images and len(images) == 1
    if len(seeds) > 1 and not same_images and not any(run.config.get("val_dir") for run in runs):
        notes.append(f"The validation images differ by seed (seeds {', '.join(map(str, seeds))}): the split is "
                     "seeded, so each run was measured on its own draw of its data, and part of a difference "
                     "between runs of different seeds is the split's")
    devices = sorted({run.device for run in runs if run.device})
    if len(devices) > 1:
        notes.append(f"The runs trained on different devices ({', '.join(devices)}): their times, img/s and memory "
                     "do not compare")
    return warnings, notes


def _difference(a: Run, b: Run) -> str | None:
    """Why runs ``a`` and ``b`` must not be compared (a clause after "runs a and b"), or None."""
    if a.config.get("data") != b.config.get("data"):
        return f"were trained on different data ({a.config.get('data')} and {b.config.get('data')})"
    if a.classes is not None and b.classes is not None and a.classes != b.classes:
        return f"have different classes ({_classes_differ(a, b)})"
    if a.val_images is not None and a.val_images == b.val_images:
        return None  # the very same validation images, however they were chosen
    for key, flag in (("val_dir", "--val-dir"), ("val_split", "--val-split")):
        if a.config.get(key) != b.config.get(key):
            return f"held out different validation images ({flag} {a.config.get(key)} and {b.config.get(key)})"
    if a.seed == b.seed and a.val_images is not None and b.val_images is not None:
        return "were validated on different images (their recorded splits differ)"
    return None


def _classes_differ(a: Run, b: Run) -> str:
    only_a = [c for c in a.classes if c not in b.classes]
    only_b = [c for c in b.classes if c not in a.classes]
    if not only_a and not only_b:
        return "the same names in another order"
    listed = lambda names: ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "none"  # noqa: E731
    return f"only in {a.name}: {listed(only_a)}; only in {b.name}: {listed(only_b)}"


def non_default_arguments(model: str, kwargs: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """The entries of ``kwargs`` that change what ``create_model(model, **kwargs)`` builds.

    Builders hand their own defaults to a shared constructor (``densenet_bc_100`` passes ``growth_rate=12``), so
    no signature holds them all; instead an argument counts as non-default when leaving it out builds a model
    with other layers, layer settings or parameter shapes. The models are built on the meta device: nothing is
    allocated or initialised. When the model cannot be built at all, every argument is returned.
    """
    import torch

    from excite.models import create_model

    base = {} if num_classes is None else {"num_classes": num_classes}
    with torch.device("meta"):
        try:
            full = _fingerprint(create_model(model, **base, **kwargs))
        except (ValueError, TypeError, RuntimeError, NotImplementedError):
            return dict(kwargs)
        changed = {}
        for key, value in kwargs.items():
            try:
                without = _fingerprint(create_model(model, **base, **{k: v for k, v in kwargs.items() if k != key}))
            except (ValueError, TypeError, RuntimeError, NotImplementedError):
                without = None  # the model needs this argument
            if without != full:
                changed[key] = value
    return changed


_SETTING_TYPES = (bool, int, float, str, tuple, type(None))


def _fingerprint(model) -> list:
    """Every module's path, type and plain settings (dropout rates, channel counts, flags), and every parameter's
    and buffer's shape: what two builds of the same architecture share."""
    modules = [(name, type(m).__name__, sorted((k, v) for k, v in vars(m).items()
                                               if not k.startswith("_") and isinstance(v, _SETTING_TYPES)))
               for name, m in model.named_modules()]
    return modules + [(k, tuple(t.shape), str(t.dtype)) for k, t in model.state_dict().items()]


def _model_size(run: Run) -> tuple[int | None, int | None]:
    """Parameters and MACs per image: from model.json, else by building the run's model again."""
    if run.model_info is not None:
        return run.model_info.get("total_params"), run.model_info.get("total_macs")
    if run.classes is None:
        run.notes.append(f"{run.name} has no model.json and no readable classes: its parameters and MACs are unknown")
        return None, None
    from excite.models import create_model, summary

    try:
        model = create_model(run.config["model"], num_classes=len(run.classes), **run.config.get("model_kwargs", {}))
        size = summary(model, img_size=run.config.get("img_size", 224))
    except (ValueError, TypeError, RuntimeError) as e:
        run.notes.append(f"{run.name} has no model.json and its model cannot be built again ({e}): its parameters "
                         "and MACs are unknown")
        return None, None
    run.notes.append(f"{run.name} has no model.json (trained by an older excite): its parameters and MACs were "
                     "counted by building its model again")
    return size.total_params, size.total_macs


def run_row(run: Run) -> dict[str, Any]:
    """The raw values of one run's row (see :attr:`Comparison.rows`)."""
    metrics = run.metrics
    if run.best_val is not None:
        best_acc, best_epoch = run.best_val.get("val_acc"), run.best_val.get("epoch")
    else:  # the first epoch of the highest accuracy, as fit() picks its best (strictly better only)
        best = max(metrics, key=lambda row: (row.get("val_acc", -1), -row["epoch"]))
        best_acc, best_epoch = best.get("val_acc"), best["epoch"]
    params, macs = _model_size(run)
    kwargs = run.config.get("model_kwargs") or {}
    arguments = non_default_arguments(run.config["model"], kwargs, len(run.classes) if run.classes else None)
    return {
        "name": run.name, "path": str(run.path.resolve()), "model": run.config["model"],
        "arguments": ", ".join(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in arguments.items()),
        "seed": run.seed, "params": params, "macs": macs, "best_val_acc": best_acc,
        "final_val_acc": metrics[-1].get("val_acc"), "best_epoch": best_epoch, "epochs": metrics[-1]["epoch"],
        "train_seconds": _total(metrics, "epoch_seconds"), "images_per_s": _mean(metrics, "train_images_per_s"),
        "peak_memory_mib": _largest(metrics, "peak_memory_mib"),
    }


def _values(rows: list[dict], key: str) -> list[float]:
    values = [row.get(key) for row in rows]
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _total(rows: list[dict], key: str) -> float | None:
    values = _values(rows, key)
    return sum(values) if len(values) == len(rows) else None  # a partial sum would pass for the whole time


def _mean(rows: list[dict], key: str) -> float | None:
    values = _values(rows, key)
    return sum(values) / len(values) if values else None


def _largest(rows: list[dict], key: str) -> float | None:
    values = _values(rows, key)
    return max(values) if values else None


def _format(key: str, value: Any) -> str:
    """A raw row value as the table shows it."""
    if value is None or value == "":
        return ""
    if key in ("params", "macs"):
        return format_count(value)
    if key in ("best_val_acc", "final_val_acc"):
        return f"{value:.1%}"
    if key == "train_seconds":
        return _duration(value)
    if key == "images_per_s":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if key == "peak_memory_mib":
        return f"{value:,.0f} MiB"
    return str(value)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _names(paths: list[Path]) -> list[str]:
    """Each run's directory name, or its path below the runs' common folder where two names are the same."""
    names = [p.resolve().name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([p.resolve() for p in paths]))
    return [str(p.resolve().relative_to(common)) or p.resolve().name for p in paths]


def compare_runs(paths: Iterable[str | os.PathLike], out: str | os.PathLike | None = None, force: bool = False,
                 conclusions: Sequence[str] = ()) -> Comparison:
    """Compare the runs in ``paths`` (run directories or folders of them) and write the table, plots and
    ``report.html`` into ``out`` (default ``comparison-<time>/`` in the current folder).

    Runs that do not measure the same thing raise :class:`~excite.errors.ExciteError` unless ``force`` (see the
    module's docstring). ``conclusions`` are lines shown first in the report (a sweep's findings).
    """
    found = find_runs(paths)
    runs = [load_run(path, name) for path, name in zip(found, _names(found))]
    warnings, notes = check_comparable(runs, force)
    rows = [run_row(run) for run in runs]
    notes += [note for run in runs for note in run.notes]
    out = Path(out) if out is not None else Path(f"comparison-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(runs, rows, warnings, notes, out, {})
    figures = {"curves.png": _curves_png(runs), "accuracy_vs_cost.png": _cost_png(rows)}
    with_classes = [run for run in runs if run.best_val]
    if with_classes:
        figures["per_class.png"] = _per_class_png(runs)
    for name, png in figures.items():
        with atomic_write(out / name) as f:
            f.write(png)
        comparison.files[name] = out / name
    confusions = []
    for i, run in enumerate(with_classes, 1):
        name = f"confusion-{i:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', run.name)}.png"
        comparison.files[name] = _plot_confusion(run, out / name)
        confusions.append((comparison.files[name].read_bytes(), f"{run.name} (epoch {run.best_val.get('epoch')})"))
    for name, text in (("comparison.csv", _csv(rows)), ("comparison.md", _markdown(comparison))):
        atomic_write_text(out / name, text)
        comparison.files[name] = out / name
    sections = _sections(comparison, figures, confusions, conclusions)
    report_html(_title(runs), sections, warnings=_forced(warnings), path=out / "report.html")
    comparison.files["report.html"] = out / "report.html"
    return comparison


def _title(runs: Sequence[Run]) -> str:
    return f"Comparison of {len(runs)} run{'s' if len(runs) != 1 else ''}"


def _forced(warnings: Sequence[str]) -> list[str]:
    return [f"compared with --force although {w}: their accuracies do not measure the same thing" for w in warnings]


def _csv(rows: list[dict]) -> str:
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return table.getvalue()


def _markdown(comparison: Comparison) -> str:
    titles = list(COLUMNS.values())
    cell = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = [f"# {_title(comparison.runs)}", ""]
    lines += [f"> **Warning:** {w}" for w in _forced(comparison.warnings)]
    lines += [f"- {note}" for note in comparison.notes]
    if len(lines) > 2:
        lines.append("")
    lines += ["| " + " | ".join(titles) + " |", "|" + "|".join("---" for _ in titles) + "|"]
    lines += ["| " + " | ".join(cell(row[t]) for t in titles) + " |" for row in comparison.table()]
    return "\n".join(lines) + "\n"


def _sections(comparison: Comparison, figures: dict[str, bytes], confusions: list[tuple[bytes, str]],
              conclusions: Sequence[str]) -> list[Section]:
    sections = []
    if conclusions:
        sections.append(Section("Conclusions", notes=conclusions))
    runs_text = ("Best val acc is the best epoch's validation accuracy (the weights kept in best.safetensors), "
                 "final val acc the last epoch's; MACs are per image at the run's image size; training time sums "
                 "the epochs (validation included); peak memory is the GPU's allocations on CUDA, the process's "
                 "peak resident size on a CPU.")
    sections.append(Section("Runs", paragraphs=[runs_text], notes=comparison.notes,
                            columns=list(COLUMNS.values()), rows=comparison.table()))
    sections.append(Section("Validation curves", images=[(figures["curves.png"], "validation accuracy and loss "
                                                          "per epoch, every run")]))
    sections.append(Section("Accuracy against size and speed", images=[
        (figures["accuracy_vs_cost.png"], "best validation accuracy against parameters, MACs per image and "
                                          "training images per second")]))
    if "per_class.png" in figures:
        sections.append(Section("Per-class accuracy", images=[
            (figures["per_class.png"], "recall of each class at each run's best epoch")]))
        sections.append(Section("Confusion matrices (best epoch, rows: true class)", images=confusions, grid=True))
    from excite.explain.report import excitation_section, latest_excitation

    for run in comparison.runs:  # `excite excitation RUN` leaves its analysis in the run directory
        if (found := latest_excitation(run.path)) is not None:
            sections.append(excitation_section(found, f"What the attention learned: {run.name}"))
    sections.append(Section("Run directories", notes=[f"{run.name}: {run.path.resolve()}" for run in comparison.runs]))
    return sections


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def _colour(index: int) -> str:
    """The run's colour in every plot: matplotlib's default cycle, by the run's place in the table."""
    return f"C{index % 10}"


def _legend(ax, count: int) -> None:
    ax.legend(fontsize="small", ncols=1 + count // 12)


def _curves_png(runs: Sequence[Run]) -> bytes:
    """Validation accuracy and loss per epoch, every run overlaid."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        epochs = [row["epoch"] for row in run.metrics]
        acc_ax.plot(epochs, [100 * row.get("val_acc", math.nan) for row in run.metrics], marker=".", label=run.name,
                    color=_colour(i))
        loss_ax.plot(epochs, [row.get("val_loss", math.nan) for row in run.metrics], marker=".", label=run.name,
                     color=_colour(i))
    acc_ax.set(title="Validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    loss_ax.set(title="Validation loss", xlabel="epoch", ylabel="loss")
    for ax in (acc_ax, loss_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _legend(ax, len(runs))
    return _png(fig)


def _cost_png(rows: list[dict]) -> bytes:
    """Best validation accuracy against parameters, MACs and img/s, each point labelled with its run."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    for ax, key, label in zip(fig.subplots(1, 3), ("params", "macs", "images_per_s"),
                              ("parameters", "MACs per image", "training images per second")):
        points: dict[tuple, list[str]] = {}  # runs at the same point share one label, not a pile of them
        for i, row in enumerate(rows):
            if row.get(key) and row.get("best_val_acc") is not None:
                x, y = row[key], 100 * row["best_val_acc"]
                ax.scatter([x], [y], s=30, color=_colour(i))
                points.setdefault((x, y), []).append(row["name"])
        for (x, y), names in points.items():
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
        xs = [x for x, _ in points]
        if xs and max(xs) > 20 * min(xs):  # sizes spanning decades read better on a log axis
            ax.set_xscale("log")
        elif key in ("params", "macs"):
            ax.xaxis.set_major_formatter(EngFormatter())  # 510.2 k, 510.4 k: enough digits to tell ticks apart
        if not points:
            ax.text(0.5, 0.5, "not recorded", transform=ax.transAxes, ha="center", va="center", color="gray")
        ax.set(title=f"Accuracy vs {label}", xlabel=label, ylabel="best validation accuracy (%)")
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    return _png(fig)


def _per_class_png(runs: Sequence[Run]) -> bytes:
    """Each class's recall (its accuracy) at each run's best epoch, as bars grouped by class; runs without a
    best_val.json have no bars."""
    shown = [(i, run, run.best_val.get("per_class", {})) for i, run in enumerate(runs) if run.best_val]
    classes = list(dict.fromkeys(c for _, _, per_class in shown for c in per_class))
    # 0.3 inch per bar between a legible 8 and a sane 20 inches.
    fig = Figure(figsize=(min(20.0, max(8.0, 0.3 * len(classes) * len(shown) + 2)), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(shown)
    for place, (i, run, per_class) in enumerate(shown):
        xs = [j + (place - (len(shown) - 1) / 2) * width for j, c in enumerate(classes) if c in per_class]
        ax.bar(xs, [100 * per_class[c]["recall"] for c in classes if c in per_class], width, label=run.name,
               color=_colour(i))
    ax.set_xticks(range(len(classes)), classes, rotation=90 if len(classes) > 12 else 0)
    ax.set(title="Per-class accuracy (recall) at the best epoch", ylabel="recall (%)", ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    _legend(ax, len(shown))
    return _png(fig)


def _plot_confusion(run: Run, path: Path) -> Path:
    """The run's best-epoch confusion matrix, normalized per true class, as excite eval draws it."""
    import torch

    from excite.report.plots import plot_confusion_matrix

    plot_confusion_matrix(torch.tensor(run.best_val["confusion"]), run.best_val.get("classes") or run.classes, path)
    return path
