"""Summarise run directories for the benchmark record: best validation accuracy, training seconds and
speed, the first epoch at which each accuracy threshold was reached, device and versions; with several
runs, their training speed relative to the first.

Seconds are the runs' own epoch times (training and validation). With torch.compile the first epoch
also compiles: ``compile_seconds_estimate`` is its excess over the median later epoch, and the
``*_without_compile`` figures subtract it.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from excite.environment import device_name, versions
from excite.io import atomic_write_json


def summarise(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    later = sorted(row["epoch_seconds"] for row in rows[1:])
    compile_seconds = max(0.0, rows[0]["epoch_seconds"] - later[len(later) // 2]) if later else 0.0
    elapsed, reached = 0.0, {}
    for row in rows:
        elapsed += row["epoch_seconds"]  # training and validation; the first epoch includes compilation
        for threshold in (0.90, 0.93, 0.94, 0.95):
            if row["val_acc"] >= threshold and threshold not in reached:
                reached[threshold] = {"epoch": row["epoch"], "seconds": round(elapsed, 1),
                                      "seconds_without_compile": round(elapsed - compile_seconds, 1)}
    return {
        "run_dir": str(run_dir), "date": time.strftime("%Y-%m-%d"),
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "versions": versions(),
        "model": config["model"], "recipe": config.get("recipe"), "epochs": len(rows),
        "best_val_acc": max(row["val_acc"] for row in rows), "final_val_acc": rows[-1]["val_acc"],
        "seconds": round(elapsed, 1), "compile_seconds_estimate": round(compile_seconds, 1),
        "seconds_without_compile": round(elapsed - compile_seconds, 1),
        "tta": config.get("tta"), "first_reached": {f"{t:.0%}": v for t, v in reached.items()},
        "train_images_per_s": sum(row["train_images_per_s"] for row in rows) / len(rows),
        "history": rows,  # every epoch's metrics: the run directories themselves may stay behind
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dirs", type=Path, nargs="+", help="one run, or several to compare with the first")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    runs = [summarise(run_dir) for run_dir in args.run_dirs]
    result = runs[0] if len(runs) == 1 else {
        "runs": runs,
        # Training images per second of each run over the first run's, epoch by epoch averaged.
        "train_speed_ratios": {run["run_dir"]: run["train_images_per_s"] / runs[0]["train_images_per_s"]
                               for run in runs[1:]},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        atomic_write_json(args.json, result)
