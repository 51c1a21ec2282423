"""Metrics files, the epoch line, classification metrics and plots."""
import csv
import json
import os

import pytest
import torch
from sklearn.metrics import precision_recall_fscore_support

from excite.report.metrics import (
    MetricsLogger,
    classification_report,
    confusion_matrix,
    format_epoch_line,
    topk_accuracy,
)
from excite.report.plots import plot_confusion_matrix, plot_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rows(n: int, val_acc: float = 0.5) -> list[dict]:
    return [{"epoch": e, "train_acc": 0.1 * e, "train_loss": 1 / e, "val_acc": val_acc, "val_loss": 2 / e,
             "lr": 1e-3} for e in range(1, n + 1)]


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_logger_writes_csv_and_jsonl(tmp_path):
    logger = MetricsLogger(tmp_path)
    for row in rows(3):
        logger.append(row)
    assert read_jsonl(tmp_path / "metrics.jsonl") == rows(3)
    assert read_csv(tmp_path / "metrics.csv") == rows(3)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "epoch,train_acc,train_loss,val_acc,val_loss,lr"

    logger.append({"epoch": 4, "train_acc": 0.4, "top5": 0.9})  # a new column extends the header
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0].endswith(",lr,top5")
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.jsonl"]
    with pytest.raises(ValueError, match="epoch"):
        logger.append({"train_acc": 0.5})


def test_metrics_logger_resume_matches_uninterrupted_run(tmp_path):
    uninterrupted, interrupted = tmp_path / "a", tmp_path / "b"
    uninterrupted.mkdir()
    interrupted.mkdir()
    final = rows(2) + rows(4, val_acc=0.9)[2:]
    logger = MetricsLogger(uninterrupted)
    for row in final:
        logger.append(row)

    logger = MetricsLogger(interrupted)
    for row in rows(3):  # epoch 3 was logged, but the run died before its checkpoint
        logger.append(row)
    logger = MetricsLogger(interrupted, resume_epoch=2)
    assert read_jsonl(interrupted / "metrics.jsonl") == rows(2)
    for row in final[2:]:
        logger.append(row)
    for name in ("metrics.csv", "metrics.jsonl"):
        assert (interrupted / name).read_bytes() == (uninterrupted / name).read_bytes()

    MetricsLogger(interrupted)  # a fresh run drops the old rows
    assert (interrupted / "metrics.jsonl").read_text() == ""


def test_format_epoch_line():
    line = format_epoch_line(1, 0.838, 0.3921, 0.868, 0.3244, 1e-4, 12.34, 1234.4)
    assert line == ("Epoch: 1, Train_acc:83.8%, Train_loss:0.392, Val_acc:86.8%, Val_loss:0.324, Lr:1.00E-04, "
                    "Time:12.3s, 1234 img/s")
    assert format_epoch_line(12, 1.0, 0.0, 0.5, 1.5, 0.1, 60.0, 99.6).startswith("Epoch:12, Train_acc:100.0%")


def test_confusion_matrix_counts_true_rows_predicted_columns():
    targets = torch.tensor([0, 0, 1, 2, 2, 2])
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(preds, targets, 3).tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_classification_report_by_hand():
    # true class in rows: a is right 3 of 4 times, b 2 of 4, c 1 of 2.
    cm = torch.tensor([[3, 1, 0], [0, 2, 2], [1, 0, 1]])
    report = classification_report(cm, ["a", "b", "c"])
    precision = {"a": 3 / 4, "b": 2 / 3, "c": 1 / 3}  # correct / column sums 4, 3, 3
    recall = {"a": 3 / 4, "b": 2 / 4, "c": 1 / 2}  # correct / row sums 4, 4, 2
    support = {"a": 4, "b": 4, "c": 2}
    f1 = {k: 2 * precision[k] * recall[k] / (precision[k] + recall[k]) for k in "abc"}
    for k in "abc":
        got = report["per_class"][k]
        assert got["support"] == support[k]
        assert got["precision"] == pytest.approx(precision[k])
        assert got["recall"] == pytest.approx(recall[k])
        assert got["f1"] == pytest.approx(f1[k])
    for name, values in [("precision", precision), ("recall", recall), ("f1", f1)]:
        assert report["macro"][name] == pytest.approx(sum(values.values()) / 3)
        assert report["weighted"][name] == pytest.approx(sum(values[k] * support[k] for k in "abc") / 10)
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["support"] == 10
    json.dumps(report)  # plain numbers, ready for eval.json


def test_classification_report_agrees_with_scikit_learn_including_unpredicted_classes():
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 5, (200,), generator=g)
    preds = torch.randint(0, 4, (200,), generator=g)  # class 4 is never predicted: precision 0, not NaN
    report = classification_report(confusion_matrix(preds, targets, 5), list("abcde"))
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(targets, preds, average=average, zero_division=0)[:3]
        assert [report[average][m] for m in ("precision", "recall", "f1")] == pytest.approx(list(expected))
    per_class = precision_recall_fscore_support(targets, preds, zero_division=0)
    assert [report["per_class"][c]["f1"] for c in "abcde"] == pytest.approx(list(per_class[2]))
    assert report["per_class"]["e"]["precision"] == 0.0


def test_topk_accuracy():
    logits = torch.tensor([[0.1, 0.5, 0.2, 0.0],   # ranking 1, 2, 0, 3
                           [0.9, 0.1, 0.3, 0.2],   # ranking 0, 2, 3, 1
                           [0.0, 0.1, 0.2, 0.3]])  # ranking 3, 2, 1, 0
    targets = torch.tensor([1, 2, 0])
    assert topk_accuracy(logits, targets, ks=(1, 2, 4, 5)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 4: 1.0, 5: 1.0})


def test_plots_write_png_files(tmp_path):
    plot_curves(rows(4), tmp_path / "curves.png")
    g = torch.Generator().manual_seed(0)
    plot_confusion_matrix(torch.randint(0, 9, (3, 3), generator=g), ["a", "b", "c"], tmp_path / "cm3.png",
                          normalize=False)
    plot_confusion_matrix(torch.randint(0, 9, (100, 100), generator=g), [f"class{i}" for i in range(100)],
                          tmp_path / "cm100.png")
    for name in ("curves.png", "cm3.png", "cm100.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert sorted(os.listdir(tmp_path)) == ["cm100.png", "cm3.png", "curves.png"]
