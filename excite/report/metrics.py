"""Per-epoch metrics files, the epoch log line, and classification metrics computed with torch."""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from excite.io import atomic_write_text

CSV_NAME = "metrics.csv"
JSONL_NAME = "metrics.jsonl"


class MetricsLogger:
    """One row per epoch in ``run_dir/metrics.csv`` and ``run_dir/metrics.jsonl``.

    Rows are dicts with an ``"epoch"`` key. Each :meth:`append` rewrites both files atomically (they
    are small), so after a crash they hold whole rows only, and the CSV header grows if a later row
    brings a new column.

    The logger starts from ``rows`` when given: a resumed run passes its checkpoint's metrics history, the
    source of truth, and the files are rewritten from it (an existing ``metrics.jsonl`` that is damaged is
    only warned about). Otherwise it starts from the rows of an existing ``metrics.jsonl`` with
    ``epoch <= resume_epoch``, skipping, with a warning, lines that are not such rows; the default 0 starts
    afresh. Either way, resuming after epoch k yields the files of an uninterrupted run.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_epoch: int = 0,
                 rows: Iterable[dict[str, Any]] | None = None):
        self.run_dir = Path(run_dir)
        self.rows: list[dict[str, Any]] = []
        jsonl = self.run_dir / JSONL_NAME
        if rows is not None:
            self.rows = [dict(row) for row in rows]
            if self.rows and jsonl.is_file():  # only to tell the user, as the file is about to be replaced
                problem = _read_rows(jsonl)[1]
                if problem:
                    warnings.warn(f"{jsonl} is damaged ({problem}); rewriting it from the checkpoint's metrics "
                                  "history", stacklevel=2)
        elif resume_epoch > 0 and jsonl.is_file():
            found, problem = _read_rows(jsonl)
            if problem:
                warnings.warn(f"{jsonl} is damaged ({problem}); keeping the {len(found)} rows that can be read",
                              stacklevel=2)
            self.rows = [row for row in found if row["epoch"] <= resume_epoch]
        self._write()

    def append(self, row: dict[str, Any]) -> None:
        """Add one epoch's row and write both files."""
        if "epoch" not in row:
            raise ValueError(f"a metrics row needs an 'epoch' key, got {sorted(row)}")
        self.rows.append(dict(row))
        self._write()

    log_epoch = append  # as a run logger (excite.report.loggers): the run's own metrics files

    def _write(self) -> None:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        table = io.StringIO()
        if columns:
            writer = csv.DictWriter(table, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(self.rows)
        atomic_write_text(self.run_dir / CSV_NAME, table.getvalue())
        atomic_write_text(self.run_dir / JSONL_NAME, "".join(json.dumps(row) + "\n" for row in self.rows))


def _read_rows(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The rows of a ``metrics.jsonl`` that are JSON objects with an integer ``"epoch"``, and what was wrong
    with the first line that is not (None when every line is a row)."""
    rows, problem = [], None
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
            what = "is not JSON"
        else:
            what = ("is not a JSON object" if not isinstance(row, dict)
                    else "has no integer 'epoch'" if type(row.get("epoch")) is not int else None)
        if what is None:
            rows.append(row)
        elif problem is None:
            problem = f"line {number} {what}"
    return rows, problem


def format_epoch_line(epoch: int, train_acc: float, train_loss: float, val_acc: float, val_loss: float,
                      lr: float, seconds: float, images_per_s: float) -> str:
    """The tutorials' epoch line (accuracies given as fractions) plus timing, e.g.
    ``Epoch: 1, Train_acc:83.8%, Train_loss:0.392, Val_acc:86.8%, Val_loss:0.324, Lr:1.00E-04, Time:12.3s, 1234 img/s``.
    """
    return (f"Epoch:{epoch:2d}, Train_acc:{train_acc * 100:.1f}%, Train_loss:{train_loss:.3f}, "
            f"Val_acc:{val_acc * 100:.1f}%, Val_loss:{val_loss:.3f}, Lr:{lr:.2E}, "
            f"Time:{seconds:.1f}s, {images_per_s:.0f} img/s")


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(num_classes, num_classes)`` counts: row = true class, column = predicted class.

    ``preds`` and ``targets`` are class indices in ``[0, num_classes)``, on any device.
    """
    pairs = targets.long().flatten() * num_classes + preds.long().flatten()
    return torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose target is among the ``k`` highest logits, for each ``k`` in ``ks``.

    A ``k`` above the number of classes counts every row as a hit.
    """
    ks = tuple(ks)
    top = logits.topk(min(max(ks), logits.size(1)), dim=1).indices
    hits = top == targets.view(-1, 1)
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def classification_report(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Precision, recall, F1 and support per class, their macro and support-weighted averages, and
    accuracy, from a confusion matrix (row = true class) as plain numbers ready for JSON.

    A class that is never predicted (or never present) gets precision (recall) 0, as scikit-learn does.
    """
    cm = confusion.detach().cpu().double()
    tp, support, predicted = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
    scores = {
        "precision": tp / predicted.clamp(min=1),
        "recall": tp / support.clamp(min=1),
        # F1 = 2PR / (P + R) = 2TP / (2TP + FP + FN), which needs no special case when P + R = 0.
        "f1": 2 * tp / (support + predicted).clamp(min=1),
    }
    weights = support / support.sum().clamp(min=1)
    return {
        "per_class": {
            name: {**{metric: values[i].item() for metric, values in scores.items()}, "support": int(support[i])}
            for i, name in enumerate(classes)
        },
        "macro": {metric: values.mean().item() for metric, values in scores.items()},
        "weighted": {metric: (values * weights).sum().item() for metric, values in scores.items()},
        "accuracy": (tp.sum() / cm.sum().clamp(min=1)).item(),
        "support": int(cm.sum()),
    }
