"""CPU inference throughput of one model three ways: PyTorch eager, eager with BatchNorm folded
(:func:`excite.nn.fold.fold_batchnorm`, what ``excite predict`` runs) and onnxruntime running the model
``excite export`` writes (BatchNorm folded, exported with torch's dynamo ONNX exporter).

Same random batch, same number of threads for torch and onnxruntime (intra-op; onnxruntime runs its graph
sequentially); each candidate is warmed up, then timed in ``--repeats`` interleaved rounds of ``--iters``
calls, each candidate leading one round in turn, so that a busy spell of a shared machine hits all of
them alike. img/s is the batch over the median call; the fastest call is kept too (the steadiest figure
on a shared machine). The outputs of the three are compared, so a fast but wrong candidate shows. Run from
the repository root::

    .venv/bin/python bench/infer_cpu.py --model se_resnet50 --img-size 224 --batch-size 8
    .venv/bin/python bench/infer_cpu.py --model densenet121 --out bench/results/infer-cpu-$(date +%F)-densenet121
"""
from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from excite.bench import time_steps, usable_cores
from excite.environment import device_name, versions
from excite.export import export_program
from excite.export.onnx import require, to_onnx
from excite.models import create_model
from excite.nn.fold import fold_batchnorm


def _key_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _onnx_session(model: torch.nn.Module, img_size: int, name: str, threads: int):
    import onnxruntime

    data = to_onnx(export_program(model, img_size, name), {"model_name": name})
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def measure(model_name: str, model_kwargs: dict, *, num_classes: int = 1000, img_size: int = 224, batch_size: int = 8,
            threads: int | None = None, warmup: int = 3, iters: int = 5, repeats: int = 5, seed: int = 0) -> dict:
    """Time eager, folded and onnxruntime inference of one model on one random batch; a JSON-ready dict."""
    require()
    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=num_classes, **model_kwargs).eval()
    folded = fold_batchnorm(model)
    session = _onnx_session(folded, img_size, model_name, threads)
    x = torch.randn(batch_size, 3, img_size, img_size)
    x_numpy = np.ascontiguousarray(x.numpy())
    input_name = session.get_inputs()[0].name

    def torch_call(m):
        def call():
            with torch.inference_mode():
                return m(x)
        return call

    calls = {"eager": torch_call(model), "folded": torch_call(folded),
             "onnxruntime": lambda: torch.from_numpy(session.run(None, {input_name: x_numpy})[0])}
    sources = {"eager": f"excite.{model_name}", "folded": "fold_batchnorm(model)",
               "onnxruntime": f"onnxruntime CPUExecutionProvider, {threads} intra-op threads"}
    reference = calls["eager"]()
    max_diff = {impl: round((call() - reference).abs().max().item(), 8) for impl, call in calls.items()}
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    times: dict[str, list[float]] = {impl: [] for impl in names}
    for r in range(repeats):
        for impl in names[r % len(names):] + names[:r % len(names)]:  # each leads a round in turn
            times[impl] += time_steps(calls[impl], iters, torch.device("cpu"))
    results = {}
    for impl in names:
        median = statistics.median(times[impl])
        results[impl] = {"source": sources[impl], "img_per_s": round(batch_size / median, 2),
                         "ms_min": round(min(times[impl]) * 1e3, 3), "ms_median": round(median * 1e3, 3),
                         "ms_p90": round(float(np.percentile(times[impl], 90)) * 1e3, 3),
                         "max_abs_diff_vs_eager": max_diff[impl]}
    import onnx
    import onnxruntime

    return {
        "model": model_name,
        "model_kwargs": model_kwargs,
        "device": device_name(torch.device("cpu")),
        "device_type": "cpu",
        "threads": threads,
        "versions": {**versions(), "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"batch_size": batch_size, "img_size": img_size, "num_classes": num_classes, "warmup": warmup,
                     "iters": iters, "repeats": repeats, "seed": seed, "dtype": "float32"},
        "results": results,
        "ratios": {impl: round(r["img_per_s"] / results["eager"]["img_per_s"], 3) for impl, r in results.items()},
    }


def format_report(result: dict) -> str:
    """A markdown table of one :func:`measure` result."""
    s = result["settings"]
    lines = [f"### {result['model']} inference on {result['device']}, {result['threads']} threads", "",
             f"batch {s['batch_size']}, {s['img_size']}x{s['img_size']}, fp32, {s['repeats']}x{s['iters']} timed "
             f"calls; torch {result['versions']['torch']}, onnxruntime {result['versions']['onnxruntime']}", "",
             "| impl | img/s | ms min / p50 / p90 | vs eager | max abs diff vs eager |", "|---|---|---|---|---|"]
    for impl, r in result["results"].items():
        times = " / ".join(f"{r[k]:.1f}" for k in ("ms_min", "ms_median", "ms_p90"))
        lines.append(f"| {impl} | {r['img_per_s']:.1f} | {times} | {result['ratios'][impl]:.2f}x | "
                     f"{r['max_abs_diff_vs_eager']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="se_resnet50")
    parser.add_argument("--model-arg", dest="model_kwargs", action="append", type=_key_value, default=[],
                        metavar="KEY=VALUE", help="builder argument, e.g. block_config=[6,12,24,16] (repeatable)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="torch and onnxruntime intra-op threads (default: usable cores)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5, help="timed calls per round")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--out", help="also write OUT.json and OUT.md (OUT without suffix)")
    args = parser.parse_args(argv)
    result = measure(args.model, dict(args.model_kwargs), num_classes=args.num_classes, img_size=args.img_size,
                     batch_size=args.batch_size, threads=args.threads, warmup=args.warmup, iters=args.iters,
                     repeats=args.repeats)
    report = format_report(result)
    print(report)
    if args.out:
        json_path, md_path = Path(f"{args.out}.json"), Path(f"{args.out}.md")
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        md_path.write_text(report)
        print(f"Wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
