"""Summarise a run directory for the benchmark record: best validation accuracy, training seconds, and
the first epoch at which each accuracy threshold was reached, with device and versions."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from excite.bench import device_name, versions
from excite.io import atomic_write_json


def summarise(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    config = json.loads((run_dir / "config.json").read_text())
    elapsed, reached = 0.0, {}
    for row in rows:
        elapsed += row["epoch_seconds"]  # training and validation; the first epoch includes compilation
        for threshold in (0.90, 0.93, 0.94, 0.95):
            if row["val_acc"] >= threshold and threshold not in reached:
                reached[threshold] = {"epoch": row["epoch"], "seconds": round(elapsed, 1)}
    return {
        "run_dir": str(run_dir), "date": time.strftime("%Y-%m-%d"),
        "device": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
        "versions": versions(),
        "model": config["model"], "recipe": config.get("recipe"), "epochs": len(rows),
        "best_val_acc": max(row["val_acc"] for row in rows), "final_val_acc": rows[-1]["val_acc"],
        "seconds": round(elapsed, 1), "first_reached": {f"{t:.0%}": v for t, v in reached.items()},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    summary = summarise(args.run_dir)
    print(json.dumps(summary, indent=2))
    if args.json:
        atomic_write_json(args.json, summary)
