"""Training curves and confusion-matrix plots.

Figures are built with :class:`matplotlib.figure.Figure` directly, not pyplot, so no global backend
or figure registry is touched (and nothing leaks when many runs plot in one process); saving to PNG
uses the Agg renderer.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from excite.io import atomic_write

# Above this many classes the per-cell numbers no longer fit in their cells.
MAX_ANNOTATED_CLASSES = 20


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
    """Accuracy and loss per epoch, training against validation, side by side (as the tutorials draw them).

    ``history`` rows carry ``epoch``, ``train_acc``, ``val_acc``, ``train_loss`` and ``val_loss``.
    """
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(12, 4), layout="constrained")
    for ax, metric, title, legend_at in zip(fig.subplots(1, 2), ("acc", "loss"), ("Accuracy", "Loss"),
                                            ("lower right", "upper right")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], label=f"Training {title}")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], label=f"Validation {title}")
        ax.set(title=f"Training and Validation {title}", xlabel="epoch", ylabel=title.lower())
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc=legend_at)
    save_figure(fig, path)


def plot_confusion_matrix(confusion: torch.Tensor, classes: Sequence[str], path: str | os.PathLike,
                          normalize: bool = True) -> None:
    """Confusion matrix (row = true class) as a heat map, each row divided by its count when
    ``normalize``; counts or fractions are written in the cells up to ``MAX_ANNOTATED_CLASSES`` classes."""
    cm = confusion.detach().cpu().double()
    if normalize:
        cm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    # 0.25 inch per class plus room for labels and colour bar, between a legible 6 and a sane 20 inches.
    side = min(20.0, max(6.0, 0.25 * n + 3))
    # Labels about half as tall as a row of cells (72 points per inch), and never above 10 pt.
    fontsize = min(10.0, 0.5 * side * 72 / n)
    fig = Figure(figsize=(side, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set_xticks(range(n), classes, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(n), classes, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix" + (" (normalized)" if normalize else ""))
    if n <= MAX_ANNOTATED_CLASSES:
        threshold = cm.max().item() / 2  # white text on the darker half of the colour map
        for i in range(n):
            for j in range(n):
                value = cm[i, j].item()
                ax.text(j, i, f"{value:.2f}" if normalize else f"{value:.0f}", ha="center", va="center",
                        fontsize=fontsize, color="white" if value > threshold else "black")
    save_figure(fig, path)


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Render ``fig`` in the format its file extension names (PNG by default) and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", bbox_inches="tight")
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
