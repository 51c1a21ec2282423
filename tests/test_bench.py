"""The benchmark measures every candidate the same way and reports what it measured."""
import argparse
import json

import pytest
import torch

from excite import bench
from excite.errors import ExciteError

TINY = dict(batch_size=2, img_size=32, warmup=1, iters=1, repeats=2, device="cpu", threads=1)


def test_benchmark_measures_excite_and_its_peers():
    result = bench.benchmark("resnet18", mode="train", **TINY)
    results = result["results"]
    assert list(results) == ["excite", "torchvision", "timm"]
    assert len({r["params"] for r in results.values()}) == 1  # the same architecture three times
    for r in results.values():
        train = r["train"]
        assert train["img_per_s"] == pytest.approx(2 / (train["ms_median"] / 1e3), rel=1e-2)
        assert 0 < train["ms_min"] <= train["ms_median"] <= train["ms_p90"]
        assert train["peak_mem_mib"] > 0
    assert result["ratios"]["excite/timm"]["train"] == pytest.approx(
        results["excite"]["train"]["img_per_s"] / results["timm"]["train"]["img_per_s"], rel=1e-2)
    assert result["threads"] == 1 and result["device_type"] == "cpu"
    assert result["versions"]["timm"] and result["settings"]["modes"] == ["train"]
    json.dumps(result)  # JSON-ready as it is

    report = bench.format_report(result)
    assert "| excite | excite.resnet18 |" in report and "timm.resnet18" in report
    assert "excite/torchvision" in report


def test_benchmark_adds_the_fast_densenet():
    result = bench.benchmark("densenet_bc_100", mode=("train", "infer"), peers=False, **TINY)
    assert list(result["results"]) == ["excite", "excite-fast"]
    assert set(result["ratios"]) == {"excite-fast/excite"}
    assert set(result["ratios"]["excite-fast/excite"]) == {"train", "infer"}
    # The buffer block keeps no concatenation per layer for backward.
    memory = {impl: r["train"]["peak_mem_mib"] for impl, r in result["results"].items()}
    assert memory["excite-fast"] < memory["excite"]


def test_benchmark_folds_batchnorm_for_inference_only():
    result = bench.benchmark("resnet20_cifar", peers=False, **TINY)
    assert list(result["results"]) == ["excite", "excite-fast"]
    assert "fold_batchnorm" in result["results"]["excite-fast"]["source"]
    assert set(result["results"]["excite-fast"]) == {"source", "params", "infer"}  # training is unchanged
    assert result["ratios"] == {"excite-fast/excite": {
        "infer": pytest.approx(result["results"]["excite-fast"]["infer"]["img_per_s"]
                               / result["results"]["excite"]["infer"]["img_per_s"], rel=1e-2)}}
    assert "| excite-fast | excite.resnet20_cifar + infer: fold_batchnorm | 0.34 | - | - | - |" in \
        bench.format_report(result)


def test_compiled_candidates_wrap_the_fastest_eager_path():
    candidates = bench._candidates("resnet18", 10, bench.MODES, peers=True, fast=True, compile="all",
                                   device=torch.device("cpu"), memory_format=torch.contiguous_format)
    assert [c.impl for c in candidates] == ["excite", "excite-fast", "excite+compile", "torchvision",
                                            "torchvision+compile", "timm", "timm+compile"]
    compiled = candidates[2].models
    assert set(compiled) == {"train", "infer"}
    assert all(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in compiled.values())
    # Inference compiles the folded model (no BatchNorm left), training the model as built.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in compiled["infer"]._orig_mod.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in compiled["train"]._orig_mod.modules())
    only_excite = bench._candidates("resnet18", 10, ("infer",), peers=True, fast=True, compile="excite",
                                    device=torch.device("cpu"), memory_format=torch.contiguous_format)
    assert [c.impl for c in only_excite] == ["excite", "excite-fast", "excite+compile", "torchvision", "timm"]


def test_step_memory_on_cpu_counts_the_tensors_alive_in_the_step():
    kept = torch.zeros(2**18)  # alive before and after: not counted

    def step():
        a = torch.ones(2**20)  # 4 MiB
        b = a * 2              # 4 MiB more while a is alive
        del a, b
        torch.ones(2**19)      # 2 MiB, after both were freed

    # 8 MiB at the peak, and a few bytes of scalars the ops wrap as tensors.
    assert bench._step_memory(step, torch.device("cpu")) == pytest.approx(2 * 2**22, abs=1024)
    assert kept.numel() == 2**18


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="fly"), "mode"),
    (dict(amp="int8"), "amp"),
    (dict(iters=1, repeats=1), "2 timed steps"),
    (dict(device="tpu"), "device"),
    (dict(compile="yes"), "compile"),
])
def test_benchmark_rejects_bad_settings(kwargs, match):
    with pytest.raises(ExciteError, match=match):
        bench.benchmark("resnet18", **{**TINY, **kwargs})


def test_main_bench_prints_and_writes_the_results(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["resnet20_cifar", "--mode", "infer", "--device", "cpu", "--batch-size", "2",
                              "--img-size", "32", "--iters", "2", "--repeats", "1", "--warmup", "0",
                              "--threads", "1", "--json", str(tmp_path / "r.json"),
                              "--markdown", str(tmp_path / "r.md")])
    assert bench.main_bench(args) == 0
    written = json.loads((tmp_path / "r.json").read_text())
    assert [r["model"] for r in written] == ["resnet20_cifar"]
    assert list(written[0]["results"]) == ["excite", "excite-fast"]
    assert all("train" not in r for r in written[0]["results"].values())
    assert (tmp_path / "r.md").read_text() in capsys.readouterr().out


def test_run_summary_separates_the_first_epochs_compilation(tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("summarise_run", Path(__file__).parents[1] / "bench" /
                                                  "summarise_run.py")
    summarise_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarise_run)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": "se_resnet18_cifar", "recipe": "cifar-fast", "tta": "flip"}))
    rows = [(0.80, 31.0), (0.91, 2.0), (0.935, 2.5), (0.94, 2.0)]  # epoch 1 compiles: 29 s over the median 2 s
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"epoch": i + 1, "val_acc": acc, "epoch_seconds": s, "train_images_per_s": 45000 / s}) + "\n"
        for i, (acc, s) in enumerate(rows)))
    summary = summarise_run.summarise(run)
    assert summary["seconds"] == 37.5 and summary["compile_seconds_estimate"] == 29.0
    assert summary["seconds_without_compile"] == 8.5 and summary["best_val_acc"] == 0.94
    assert summary["first_reached"]["93%"] == {"epoch": 3, "seconds": 35.5, "seconds_without_compile": 6.5}
    assert "95%" not in summary["first_reached"] and [row["val_acc"] for row in summary["history"]] == [
        0.8, 0.91, 0.935, 0.94]


def test_main_bench_keeps_the_models_measured_before_a_failure(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["resnet20_cifar", "no_such_model", "--mode", "infer", "--device", "cpu",
                              "--batch-size", "2", "--img-size", "32", "--iters", "2", "--repeats", "1",
                              "--warmup", "0", "--threads", "1", "--no-fast", "--json", str(tmp_path / "r.json")])
    with pytest.raises(ExciteError, match="no_such_model"):
        bench.main_bench(args)
    assert [r["model"] for r in json.loads((tmp_path / "r.json").read_text())] == ["resnet20_cifar"]
