"""Speed and memory of excite models next to their torchvision and timm twins, measured the same way.

For each candidate in one process, on one random batch:

* **train**: a full step (forward, cross-entropy, backward, SGD with momentum) in training mode;
* **infer**: a forward pass in eval mode under ``torch.inference_mode``.

The candidates: ``excite`` (the model as built); ``excite-fast``, excite's fast path for the mode
where it differs (training: the buffer dense block of :func:`~excite.nn.dense_fast.make_fast` for
DenseNets; inference: BatchNorm folded into the convolutions by
:func:`~excite.nn.fold.fold_batchnorm`); with ``compile="excite"`` also ``excite+compile``, the
fastest eager excite path for the mode under ``torch.compile``; and the torchvision / timm twins that
are installed (with ``compile="all"`` each also compiled, as ``timm+compile`` and so on).

Candidates are warmed up, then timed in ``repeats`` interleaved rounds of ``iters`` steps each, so
that a slow spell of a shared machine hits all of them alike. Per-step times come from CUDA events
on a GPU and from ``time.perf_counter`` on a CPU (where every op is synchronous); throughput is
``batch_size`` over the median step time; the fastest step is kept too, the steadiest figure on a
machine that other jobs share. Peak memory is measured in a separate pass, after the
timing: the most bytes of tensors alive during one step above those alive before it (activations,
gradients and temporaries; not the weights or the optimizer state), from
``torch.cuda.max_memory_allocated`` on CUDA and from the profiler's allocation trace on a CPU.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import itertools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from excite.bench_options import COMPILE_CHOICES, MODES, add_arguments
from excite.environment import device_name, select_device, versions
from excite.errors import ExciteError
from excite.io import atomic_write_json, atomic_write_text
from excite.models import DenseNet, create_model
from excite.nn.dense_fast import make_fast
from excite.nn.fold import fold_batchnorm

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The same architecture elsewhere: excite name -> {package: name in that package}.
PEERS: dict[str, dict[str, str]] = {
    **{f"densenet{d}": {"torchvision": f"densenet{d}", "timm": f"densenet{d}"} for d in (121, 161, 169, 201)},
    **{f"resnet{d}": {"torchvision": f"resnet{d}", "timm": f"resnet{d}"} for d in (18, 34, 50, 101, 152)},
    **{f"se_resnet{d}": {"timm": f"seresnet{d}"} for d in (18, 34, 50, 101, 152)},
}


@dataclass
class _Candidate:
    impl: str    # "excite", "excite-fast", "excite+compile", "torchvision", "timm+compile"...
    source: str  # what was built, e.g. "timm.seresnet50"
    models: dict[str, nn.Module]  # mode -> the module measured in that mode (a candidate may skip a mode)
    params: int


def _build_peer(package: str, name: str, num_classes: int) -> nn.Module:
    if package == "torchvision":
        return getattr(importlib.import_module("torchvision.models"), name)(weights=None, num_classes=num_classes)
    return importlib.import_module("timm").create_model(name, pretrained=False, num_classes=num_classes)


def _candidates(model_name: str, num_classes: int, modes: Sequence[str], peers: bool, fast: bool,
                compile: str, device: torch.device, memory_format: torch.memory_format) -> list[_Candidate]:
    """Every candidate to measure (see the module docstring), the excite model first, on ``device``."""
    try:
        model = create_model(model_name, num_classes=num_classes)
    except ValueError as e:  # an unknown name (its message lists the close ones)
        raise ExciteError(str(e)) from None
    model = model.to(device, memory_format=memory_format)
    params = sum(p.numel() for p in model.parameters())

    def both(m: nn.Module) -> dict[str, nn.Module]:
        # A copy per mode: training steps must not change the weights that inference is timed with.
        return {mode: copy.deepcopy(m) for mode in modes}

    candidates = [_Candidate("excite", f"excite.{model_name}", both(model), params)]
    # The fastest eager path per mode: the buffer block trains DenseNets, folded BatchNorm infers.
    fast_models = {}
    if "train" in modes and isinstance(model, DenseNet):
        fast_models["train"] = make_fast(copy.deepcopy(model))
    if "infer" in modes and (fast or compile != "none"):
        fast_models["infer"] = fold_batchnorm(model)
    if fast and fast_models:
        source = " / ".join(f"{mode}: " + ("make_fast" if mode == "train" else "fold_batchnorm")
                            for mode in fast_models)
        candidates.append(_Candidate("excite-fast", f"excite.{model_name} + {source}", fast_models, params))
    if compile in ("excite", "all"):
        # Training compiles the model as built: inside torch.compile the buffer block takes the plain path.
        eager = {"train": model, **({"infer": fast_models["infer"]} if "infer" in modes else {})}
        candidates.append(_Candidate("excite+compile", f"torch.compile(excite.{model_name})",
                                     {mode: torch.compile(copy.deepcopy(eager[mode])) for mode in modes}, params))
    for package, name in (PEERS.get(model_name, {}).items() if peers else ()):
        if importlib.util.find_spec(package) is None:
            continue
        peer = _build_peer(package, name, num_classes).to(device, memory_format=memory_format)
        peer_params = sum(p.numel() for p in peer.parameters())
        candidates.append(_Candidate(package, f"{package}.{name}", both(peer), peer_params))
        if compile == "all":
            candidates.append(_Candidate(f"{package}+compile", f"torch.compile({package}.{name})",
                                         {mode: torch.compile(m) for mode, m in both(peer).items()}, peer_params))
    return candidates


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def time_steps(step: Callable[[], None], iters: int, device: torch.device) -> list[float]:
    """Seconds each of ``iters`` calls of ``step`` took."""
    if device.type == "cuda":
        # Events time the GPU's own timeline without stalling the queue between steps.
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
        events[0].record()
        for event in events[1:]:
            step()
            event.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in itertools.pairwise(events)]
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def _step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes of tensors alive during one ``step`` above those alive before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    # "Total Allocated" counts the bytes of every allocation the profiler has seen that is still alive,
    # so the step's own peak is measured from the total just before its first event.
    totals = [e["args"]["Total Allocated"] for e in events]
    before = totals[0] - events[0]["args"]["Bytes"]
    return max(before, *totals) - before


def _make_step(model: nn.Module, mode: str, x: torch.Tensor, y: torch.Tensor, amp: str | None) -> Callable[[], None]:
    def autocast() -> torch.autocast:
        return torch.autocast(x.device.type, dtype=AMP_DTYPES[amp], enabled=amp is not None)

    if mode == "infer":
        model.eval()

        @torch.inference_mode()
        def infer_step() -> None:
            with autocast():
                model(x)

        return infer_step

    model.train()
    # SGD with the usual ImageNet hyper-parameters: the update's cost, not its quality, matters here.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(x.device.type, enabled=amp == "fp16")

    def train_step() -> None:
        with autocast():
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        # Freed here rather than before the forward so that every step starts without gradients.
        optimizer.zero_grad(set_to_none=True)

    return train_step


def _summary(times: list[float], batch_size: int, memory: int) -> dict[str, float]:
    median = statistics.median(times)
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1]
    return {"img_per_s": round(batch_size / median, 2), "ms_median": round(median * 1e3, 3),
            "ms_p90": round(p90 * 1e3, 3), "ms_min": round(min(times) * 1e3, 3),
            "peak_mem_mib": round(memory / 2**20, 2)}


def benchmark(
    model_name: str,
    *,
    batch_size: int = 32,
    img_size: int = 224,
    mode: str | Sequence[str] = MODES,
    amp: str | None = None,
    channels_last: bool = False,
    compile: str = "none",
    device: str = "auto",
    warmup: int = 3,
    iters: int = 10,
    repeats: int = 3,
    threads: int | None = None,
    peers: bool = True,
    fast: bool = True,
    num_classes: int = 1000,
    seed: int = 0,
) -> dict:
    """Measure ``model_name`` (and its peers) and return the results as a JSON-ready dict.

    Args:
        mode: "train", "infer" or both.
        amp: None (fp32), "bf16" or "fp16" autocast; fp16 training uses a GradScaler.
        channels_last: put the models and the batch in channels-last memory format.
        compile: "none"; "excite" adds ``excite+compile``, the excite model under ``torch.compile``;
            "all" also adds a compiled twin of every peer.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N" (the grammar of every ``--device``;
            "mps" is refused: the timing and memory code knows CPU and CUDA).
        warmup: untimed steps per candidate and mode before timing.
        iters, repeats: ``repeats`` interleaved rounds of ``iters`` timed steps per candidate.
        threads: torch intra-op threads (default: every core this process may use).
        peers: also measure the torchvision / timm equivalents from :data:`PEERS` that are installed.
        fast: also measure ``excite-fast`` (see the module docstring).

    The dict holds the device, versions, date, settings, per-candidate ``results`` (img/s, median and
    p90 ms per batch, peak step memory in MiB, parameter count) and ``ratios``: throughput of each
    excite candidate over each peer and of each excite variant over plain ``excite`` (above 1: the
    first is faster), for the modes both measured.
    """
    modes = (mode,) if isinstance(mode, str) else tuple(mode)
    if not modes or any(m not in MODES for m in modes):
        raise ExciteError(f"benchmark mode must be train, infer or both, got {mode!r}")
    if compile not in COMPILE_CHOICES:
        raise ExciteError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {compile!r}")
    if amp not in AMP_DTYPES:
        raise ExciteError(f"amp must be none, bf16 or fp16, got {amp!r}")
    if min(batch_size, img_size, iters, repeats) < 1 or warmup < 0 or iters * repeats < 2:
        raise ExciteError("batch size, image size, iters and repeats must be positive, "
                          "with at least 2 timed steps in all")
    dev = select_device(device, allow_mps=False)  # the timing and memory code knows CPU and CUDA
    if threads is not None or dev.type == "cpu":
        torch.set_num_threads(threads or usable_cores())
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the fastest kernels for this fixed shape, for every candidate
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    torch.manual_seed(seed)
    x = torch.randn(batch_size, 3, img_size, img_size, device=dev).contiguous(memory_format=memory_format)
    y = torch.randint(num_classes, (batch_size,), device=dev)
    candidates = _candidates(model_name, num_classes, modes, peers, fast, compile, dev, memory_format)

    results = {c.impl: {"source": c.source, "params": c.params} for c in candidates}
    for m in modes:
        measured = [c for c in candidates if m in c.models]
        steps = {c.impl: _make_step(c.models[m], m, x, y, amp) for c in measured}
        for c in measured:
            for _ in range(warmup):
                steps[c.impl]()
        times: dict[str, list[float]] = {c.impl: [] for c in measured}
        for r in range(repeats):
            for c in measured[r % len(measured):] + measured[:r % len(measured)]:  # each leads a round
                times[c.impl] += time_steps(steps[c.impl], iters, dev)
        for c in measured:
            results[c.impl][m] = _summary(times[c.impl], batch_size, _step_memory(steps[c.impl], dev))

    def is_excite(impl: str) -> bool:
        return impl.startswith("excite")

    ratios = {}
    for a in filter(is_excite, results):
        for b, other in results.items():
            if b != a and (not is_excite(b) or b == "excite"):
                shared = [m for m in modes if m in results[a] and m in other]
                if shared:
                    ratios[f"{a}/{b}"] = {m: round(results[a][m]["img_per_s"] / other[m]["img_per_s"], 3)
                                          for m in shared}
    return {
        "model": model_name,
        "device": device_name(dev),
        "device_type": dev.type,
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"batch_size": batch_size, "img_size": img_size, "modes": list(modes), "amp": amp,
                     "channels_last": channels_last, "compile": compile, "warmup": warmup, "iters": iters,
                     "repeats": repeats, "num_classes": num_classes, "seed": seed,
                     "cudnn_benchmark": dev.type == "cuda"},
        "peers_missing": sorted(set(PEERS.get(model_name, {})) - set(results)) if peers else [],
        "results": results,
        "ratios": ratios,
    }


def format_report(result: dict) -> str:
    """A short markdown report of one :func:`benchmark` result: a table per candidate, then the ratios."""
    s, modes = result["settings"], result["settings"]["modes"]
    settings = (f"batch {s['batch_size']}, {s['img_size']}x{s['img_size']}, amp {s['amp'] or 'fp32'}, "
                f"channels_last {s['channels_last']}, compile {s['compile']}, "
                f"{s['repeats']}x{s['iters']} timed steps; torch {result['versions']['torch']}")
    lines = [f"### {result['model']} on {result['device']}, torch threads: {result['threads']}", "", settings, ""]
    header = ["impl", "source", "params (M)"]
    for m in modes:
        header += [f"{m} img/s", f"{m} ms min / p50 / p90", f"{m} peak MiB"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for impl, r in result["results"].items():
        row = [impl, r["source"], f"{r['params'] / 1e6:.2f}"]
        for m in modes:
            if m not in r:  # a variant that only differs in the other mode
                row += ["-", "-", "-"]
                continue
            times = " / ".join(f"{r[m][k]:.1f}" for k in ("ms_min", "ms_median", "ms_p90"))
            row += [f"{r[m]['img_per_s']:.1f}", times, f"{r[m]['peak_mem_mib']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    if result["ratios"]:
        lines += ["", "Throughput ratios (above 1: the first is faster): " + "; ".join(
            f"{pair} " + ", ".join(f"{m} {v:.2f}x" for m, v in r.items()) for pair, r in result["ratios"].items())]
    if result["peers_missing"]:
        lines += ["", f"Not installed, so not measured: {', '.join(result['peers_missing'])}."]
    return "\n".join(lines) + "\n"


def main_bench(args: argparse.Namespace) -> int:
    """Run :func:`benchmark` for each of ``args.models``, print the reports and write the files asked for,
    after each model, so that a run stopped part-way keeps the models it measured."""
    for path in (args.json, args.markdown):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
    results, reports = [], []
    for name in args.models:
        result = benchmark(name, batch_size=args.batch_size, img_size=args.img_size,
                           mode=MODES if args.mode == "both" else args.mode,
                           amp=None if args.amp == "none" else args.amp, channels_last=args.channels_last,
                           compile=args.compile, device=args.device, warmup=args.warmup, iters=args.iters,
                           repeats=args.repeats, threads=args.threads, peers=args.peers, fast=args.fast)
        results.append(result)
        reports.append(format_report(result))
        print(reports[-1], flush=True)
        if args.json:
            atomic_write_json(args.json, results)
        if args.markdown:
            atomic_write_text(args.markdown, "\n".join(reports))
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m excite.bench", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    raise SystemExit(main_bench(_parser.parse_args()))
