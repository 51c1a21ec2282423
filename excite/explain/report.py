"""``excite excitation RUN --data DIR``: the gate analysis of a trained run, as figures, JSON and a page."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from excite.data import make_loader
from excite.data.loader import default_workers
from excite.environment import select_device
from excite.errors import ExciteError
from excite.explain.excitation import (
    ExcitationStats,
    NoAttention,
    excitation_stats,
    replaced_gate_accuracy,
    stage_label,
)
from excite.inference import checkpoint_dir, eval_dataset, load_for_inference
from excite.io import atomic_write_json
from excite.report.html import Section, report_html
from excite.report.plots import save_figure

#: Above this many classes the per-class lines are not told apart by a legend.
MAX_LEGEND_CLASSES = 12


def plot_class_excitation(stats: ExcitationStats, path: str | os.PathLike) -> None:
    """The paper's figure: for the last attention layer of each stage, the mean gate of every channel (x) for
    each class (one line per class), stages side by side, shallow to deep."""
    stages = stats.stages()
    fig = Figure(figsize=(4.2 * len(stages), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(stages), sharey=True))
    for ax, (stage, layers) in zip(axes, sorted(stages.items())):
        layer = layers[-1]
        for k, name in enumerate(stats.classes):
            if layer.count[k]:
                ax.plot(layer.class_mean[k], linewidth=0.8, label=name)
        ax.set(title=f"{stage_label(stats, stage)}\n{layer.name}", xlabel="channel index", ylim=(0, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylabel("mean gate value")
    if len(stats.classes) <= MAX_LEGEND_CLASSES:
        fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside right upper")
    save_figure(fig, path)


def plot_specificity(stats: ExcitationStats, path: str | os.PathLike) -> None:
    """Class-specificity of every attention layer against its depth, coloured by stage."""
    fig = Figure(figsize=(8, 3.6), layout="constrained")
    ax = fig.subplots()
    depth = 0
    for stage, layers in sorted(stats.stages().items()):
        xs = range(depth, depth + len(layers))
        ax.plot(xs, [layer.specificity for layer in layers], "o-", label=stage_label(stats, stage))
        depth += len(layers)
    ax.set(xlabel="attention layer (input to output)", ylabel="between-class / within-class spread",
           title="How class-specific the gates are, by depth")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def stage_summary(stats: ExcitationStats, replaced: dict[int, float]) -> list[dict]:
    """One row per stage: layers, mean specificity and saturation, and the accuracy with its gates fixed."""
    rows = []
    for stage, layers in sorted(stats.stages().items()):
        rows.append({"stage": stage_label(stats, stage), "layers": len(layers),
                     "specificity": float(np.mean([layer.specificity for layer in layers])),
                     "saturation": float(np.mean([layer.saturation for layer in layers])),
                     "accuracy_with_mean_gates": replaced[stage],
                     "accuracy_change": replaced[stage] - stats.accuracy})
    return rows


def excitation_report(checkpoint_path: str | os.PathLike, data: str, *, out: str | None = None,
                      split: str = "auto", batch_size: int = 128, device: str = "auto",
                      data_root: str | None = None, log=print) -> dict:
    """Run ``data`` through a trained model, record every attention layer's gates, and write into ``out``
    (default ``excitation-<data>`` beside the checkpoint): ``excitation.json`` (every number),
    ``excitation.png`` (mean gate per channel and class, a few stages side by side), ``specificity.png``
    (class-specificity by depth) and ``excitation.html``. ``split`` chooses the images as
    ``excite eval`` does. Returns the JSON's content."""
    if batch_size < 1:
        raise ExciteError(f"--batch-size must be at least 1, got {batch_size}")
    torch_device = select_device(device)
    model, classes, transform, checkpoint = load_for_inference(checkpoint_path, torch_device, fold=False)
    dataset, split = eval_dataset(checkpoint_path, checkpoint, classes, transform, data, split=split,
                                  data_root=data_root, log=log)
    loader = make_loader(dataset, batch_size, train=False, workers=default_workers(torch_device))
    try:
        stats = excitation_stats(model, loader, list(classes), device=torch_device)
    except NoAttention as error:
        raise ExciteError(str(error)) from None
    replaced = {stage: replaced_gate_accuracy(model, loader, stats, stage, device=torch_device)
                for stage in stats.stages()}
    rows = stage_summary(stats, replaced)
    result = {"checkpoint": str(checkpoint_path), "data": str(data), "split": split, "stages": rows,
              **stats.to_dict()}

    out_dir = Path(out) if out else checkpoint_dir(checkpoint_path) / f"excitation-{Path(str(data)).name}"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "excitation.json", result)
    plot_class_excitation(stats, out_dir / "excitation.png")
    plot_specificity(stats, out_dir / "specificity.png")
    report_html(f"What the attention learned: {Path(str(checkpoint_path)).name}", [excitation_section(out_dir)],
                path=out_dir / "excitation.html")

    log(f"{stats.images} images ({split}), {len(stats.layers)} attention layers, accuracy {stats.accuracy:.2%}")
    for row in rows:
        log(f"  {row['stage']:>18}: {row['layers']:>3} layers, specificity {row['specificity']:.3f}, "
            f"saturated {row['saturation']:.0%}, accuracy with mean gates {row['accuracy_with_mean_gates']:.2%} "
            f"({row['accuracy_change']:+.2%})")
    log(f"Wrote {out_dir / 'excitation.json'}, excitation.png, specificity.png and excitation.html")
    return result


def excitation_section(out_dir: str | os.PathLike, title: str = "What the attention learned") -> Section:
    """The analysis that :func:`excitation_report` wrote into ``out_dir``, as one report section (its own page,
    and ``excite compare``'s report for runs that have one)."""
    out_dir = Path(out_dir)
    result = json.loads((out_dir / "excitation.json").read_text())
    return Section(
        title,
        paragraphs=[f"{result['images']} images ({result['split']} split of {result['data']}); accuracy "
                    f"{result['accuracy']:.2%}. Specificity is, per channel, the spread of the class means over "
                    "the spread within a class, averaged over channels: near 0 the gate is the same for every "
                    "class. Saturated: the share of channels whose mean gate is above 0.9 or below 0.1. The last "
                    "columns are the accuracy with each stage's gates fixed at their data-set mean (a constant "
                    "gate), the other stages left as they are."],
        columns=["stage", "layers", "specificity", "saturated", "accuracy with mean gates", "change"],
        rows=[[r["stage"], r["layers"], f"{r['specificity']:.3f}", f"{r['saturation']:.0%}",
               f"{r['accuracy_with_mean_gates']:.2%}", f"{r['accuracy_change']:+.2%}"] for r in result["stages"]],
        images=[((out_dir / "excitation.png").read_bytes(), "mean gate per channel and class, last attention layer "
                                                            "of each stage"),
                ((out_dir / "specificity.png").read_bytes(), "class-specificity of every attention layer by depth")],
        grid=True)


def latest_excitation(run_dir: str | os.PathLike) -> Path | None:
    """The newest ``excitation-*`` folder of a run directory with a complete analysis in it, if any."""
    found = [p.parent for p in Path(run_dir).glob("excitation-*/excitation.json")
             if (p.parent / "excitation.png").exists() and (p.parent / "specificity.png").exists()]
    return max(found, key=lambda p: (p / "excitation.json").stat().st_mtime, default=None)
