"""Fine-tuning pretrained weights against training from scratch, at the same budget, on real images.

There are no ImageNet weights on the machines this runs on, so the "pretrained" weights are made here: a small
model (resnet20_cifar) trained for a few epochs on 7 CIFAR-10 classes. Its best.safetensors is then fine-tuned
with ``excite train --pretrained ... --recipe finetune`` on the 3 other classes, few images each, and compared
with the same model trained from scratch for the same epochs on the same images (with the finetune recipe's
options, and with excite's from-scratch defaults), over several seeds. Every run is the ``excite train`` CLI in
a subprocess; the commands are recorded in the results.

    python bench/finetune_vs_scratch.py --cifar /tmp/cifar/train   # the JPEG CIFAR-10 training set, by class

writes ``bench/results/finetune-vs-scratch-DATE.json`` and ``.md``. Run again with the same ``--work``, it keeps
the runs that finished and trains (or resumes) the others: the machine it was written on is shared and slow.
Accuracy is that of the last epoch on the held-out images of the 3 classes (no model selection on them); the best
epoch's is recorded beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
PRETRAIN_CLASSES, TARGET_CLASSES = CLASSES[:7], CLASSES[7:]
MODEL = ["--model", "resnet20_cifar"]
COMMON = ["--workers", "0", "--progress-seconds", "0"]

# What is compared on the 3 target classes; each runs once per seed with the same epochs and images.
VARIANTS = {
    "finetune": ["--pretrained", "{pretrained}", "--recipe", "finetune"],
    "scratch-finetune-recipe": ["--recipe", "finetune", "--head-lr-mult", "1"],
    # excite's own defaults for a run from scratch (SGD lr 0.05, cosine, weight decay 5e-4).
    "scratch-defaults": [],
}


def link_images(cifar: Path, out: Path, classes, start: int, count: int) -> None:
    """``out/<class>/`` holding symbolic links to images ``start`` to ``start + count`` of each class."""
    for name in classes:
        files = sorted((cifar / name).glob("*.jpg"))[start:start + count]
        if len(files) < count:
            sys.exit(f"{cifar / name} has {len(files)} images from number {start}, {count} needed")
        (out / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            (out / name / f.name).symlink_to(f)


def excite_train(args: list[str]) -> None:
    """Run ``excite train ARGS`` with this interpreter and this tree's excite."""
    subprocess.run([sys.executable, "-m", "excite", "train", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def train_once(run: Path, args: list[str], epochs: int) -> dict:
    """``excite train ARGS`` into ``run`` unless it already finished there (resumed if it was cut short): its
    command and results."""
    if run_result(run)["epochs"] < epochs:
        excite_train(["--resume", str(run)] if (run / "last.pt").exists() else args)
    return {"command": ["python", "-m", "excite", "train", *args], **run_result(run)}


def run_result(run: Path) -> dict:
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not rows:
        return {"epochs": 0}
    return {"final_val_acc": rows[-1]["val_acc"], "best_val_acc": max(r["val_acc"] for r in rows),
            "epochs": len(rows), "train_seconds": round(sum(r["epoch_seconds"] for r in rows), 1),
            # More than one: the run was cut short and resumed (exactly: see excite.train.fit).
            "sessions": len(json.loads((run / "environment.json").read_text()))}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cifar", type=Path, default=Path("/tmp/cifar/train"), help="CIFAR-10 JPEGs, one folder a class")
    p.add_argument("--work", type=Path, default=Path("/tmp/excite-finetune-bench"), help="data links and runs")
    p.add_argument("--pretrain-per-class", type=int, default=800)
    p.add_argument("--pretrain-epochs", type=int, default=6)
    p.add_argument("--per-class", type=int, default=200, help="training images of each target class")
    p.add_argument("--val-per-class", type=int, default=300, help="held-out images of each target class")
    p.add_argument("--epochs", type=int, default=10, help="epochs of every run on the target classes")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    a = p.parse_args()

    pre_data, target = a.work / "pretrain-data", a.work / "target-data"
    if not a.work.exists():
        link_images(a.cifar, pre_data, PRETRAIN_CLASSES, 0, a.pretrain_per_class)
        # The target classes' training and held-out images are disjoint: train/ and val/ of one folder.
        link_images(a.cifar, target / "train", TARGET_CLASSES, 0, a.per_class)
        link_images(a.cifar, target / "val", TARGET_CLASSES, a.per_class, a.val_per_class)

    pre_run = a.work / "pretrain"
    pre_args = [*MODEL, "--data", str(pre_data), "--out", str(pre_run), "--epochs", str(a.pretrain_epochs),
                "--batch-size", "128", "--lr", "0.1", "--val-split", "0.1", "--seed", "0", *COMMON]
    runs = {"pretrain": train_once(pre_run, pre_args, a.pretrain_epochs)}
    print(f"pretrain: {runs['pretrain']}", flush=True)

    pretrained = str(pre_run / "best.safetensors")
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for seed in range(a.seeds):
        for name, flags in VARIANTS.items():
            run = a.work / f"{name}-seed{seed}"
            args = [*MODEL, "--data", str(target), "--out", str(run), "--epochs", str(a.epochs), "--batch-size", "64",
                    "--seed", str(seed), *COMMON, *(f.format(pretrained=pretrained) for f in flags)]
            results[name].append({"seed": seed, **train_once(run, args, a.epochs)})
            print(f"{name} seed {seed}: {results[name][-1]['final_val_acc']:.1%}", flush=True)

    summary = {}
    for name, rows in results.items():
        final, best = (mean_std([r[key] for r in rows]) for key in ("final_val_acc", "best_val_acc"))
        summary[name] = {"final_val_acc_mean": final[0], "final_val_acc_std": final[1],
                         "best_val_acc_mean": best[0], "best_val_acc_std": best[1]}
    import torch
    import torchvision

    from excite import __version__
    date = time.strftime("%Y-%m-%d")
    record = {
        "what": "fine-tuning vs training from scratch on 3 CIFAR-10 classes at the same budget",
        "pretrained_weights": f"{MODEL[1]} trained {a.pretrain_epochs} epochs on {a.pretrain_per_class} "
                              f"images of each of {', '.join(PRETRAIN_CLASSES)} (not ImageNet weights)",
        "target": f"{a.per_class} training and {a.val_per_class} held-out images of each of "
                  f"{', '.join(TARGET_CLASSES)}; {a.epochs} epochs per run, seeds 0-{a.seeds - 1}",
        "date": date, "device": cpu_name(),
        # OMP_NUM_THREADS=1 ran 2x faster than 2 threads on the 2 busy cores it was written on; no effect on accuracy.
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {"excite": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "python": platform.python_version()},
        "command": [Path(sys.executable).name, *sys.argv], "summary": summary, "runs": {**runs, **results},
    }
    a.results.mkdir(parents=True, exist_ok=True)
    out = a.results / f"finetune-vs-scratch-{date}"
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [f"# Fine-tuning vs from scratch, {date}", "",
             f"{record['what']}. **The pretrained weights were made here**: {record['pretrained_weights']}; its "
             f"validation accuracy on 10% of those images: {runs['pretrain']['final_val_acc']:.1%} "
             f"({runs['pretrain']['train_seconds']:.0f} s of training and validation, in "
             f"{runs['pretrain']['sessions']} session(s)). Target: {record['target']}.", "",
             f"Device: {record['device']} (OMP_NUM_THREADS={record['omp_num_threads']}); "
             + ", ".join(f"{k} {v}" for k, v in record["versions"].items()) + ".", "",
             "| variant | extra options | last-epoch val acc (mean ± std) | best-epoch val acc |", "|---|---|---|---|"]
    for name, s in summary.items():
        flags = " ".join(VARIANTS[name]).replace("{pretrained}", "PRE/best.safetensors") or "(excite's defaults)"
        lines.append(f"| {name} | `{flags}` | {s['final_val_acc_mean']:.1%} ± {s['final_val_acc_std']:.1%} | "
                     f"{s['best_val_acc_mean']:.1%} ± {s['best_val_acc_std']:.1%} |")
    lines += ["", "Every run: `python -m excite train --model resnet20_cifar --data TARGET --epochs "
              f"{a.epochs} --batch-size 64 --seed S {' '.join(COMMON)}` plus the variant's options; the pretraining "
              f"run: `{' '.join(runs['pretrain']['command'])}`. Exact commands: the JSON file.",
              f"Produced by `{' '.join(record['command'])}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}.json and .md")


if __name__ == "__main__":
    main()
