"""excite export: every model family exports to ONNX and computes what PyTorch computes, at any batch size; the
file carries the run's preprocessing and classes; predict --onnx agrees with predict; a failed check writes
nothing; bad input is one line."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import excite.export as export_module  # noqa: E402
from excite.cli import main  # noqa: E402
from excite.data.transforms import NORMALIZATION  # noqa: E402
from excite.errors import ExciteError  # noqa: E402
from excite.export import PARITY_TOLERANCE, export_run, load_torch_export  # noqa: E402
from excite.export.onnx import load_onnx, predict_onnx  # noqa: E402
from excite.inference import predict  # noqa: E402
from excite.models import DPN, DenseNet, ResDense, ResNet, create_model  # noqa: E402
from excite.train.checkpoint import save_weights  # noqa: E402

CLASSES = ["blue", "green", "red"]
#: One small model of each family and attention: (name, builder arguments, image size).
FAMILIES = {
    "densenet_bc": ("densenet_bc_100", dict(block_config=(2, 2), growth_rate=4), 16),
    "se_densenet_bc": ("se_densenet_bc_100", dict(block_config=(2, 2), growth_rate=4), 16),
    "densenet_imagenet_stem": ("densenet121", dict(block_config=(1, 1), growth_rate=4, num_init_features=8), 32),
    "resnet": ("resnet20_cifar", dict(layers=(1, 1, 1), widths=(4, 8, 8)), 16),
    "se_resnet": ("se_resnet20_cifar", dict(layers=(1, 1, 1), widths=(8, 16, 16)), 16),
    "eca_resnet": ("resnet20_cifar", dict(layers=(1, 1, 1), widths=(8, 16, 16), attn_layer="eca"), 16),
    "cbam_resnet": ("resnet20_cifar", dict(layers=(1, 1, 1), widths=(8, 16, 16), attn_layer="cbam"), 16),
    "dpn": ("dpn68", dict(k_sec=(1, 1, 1, 1), inc_sec=(4, 4, 4, 4), k_r=32, groups=4, num_init_features=8), 32),
    "resdense": ("resdense_j4", dict(block_config=(1, 1), num_init_features=8), 32),
}


def write_weights(path: Path, name: str = "se_resnet20_cifar", kwargs: dict | None = None, img_size: int = 16,
                  preset: str = "cifar") -> tuple[Path, torch.nn.Module]:
    """A weights file of an untrained model whose BatchNorms have random statistics (so folding them changes the
    weights), and the model."""
    kwargs = {**(kwargs if kwargs is not None else FAMILIES["se_resnet"][1]), "num_classes": len(CLASSES)}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    save_weights(path, {"model": model.state_dict(), "model_name": name, "model_kwargs": kwargs,
                        "classes": CLASSES, "img_size": img_size, "preset": preset})
    return path, model


def run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def run_cli(argv: list[str], capsys) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err.splitlines()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    """A small SE-ResNet's weights file, its ONNX export beside it and the model."""
    weights, model = write_weights(tmp_path_factory.mktemp("export") / "w.safetensors")
    result = export_run(weights)
    return weights, result.path, model


def test_the_families_cover_every_model_class_and_attention():
    classes = {type(create_model(name, num_classes=3, **kwargs)) for name, kwargs, _ in FAMILIES.values()}
    assert classes == {DenseNet, ResNet, DPN, ResDense}
    attentions = {kwargs.get("attn_layer", "se" if name.startswith("se_") else None)
                  for name, kwargs, _ in FAMILIES.values()}
    assert attentions == {None, "se", "eca", "cbam"}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_exports_to_onnx_with_the_same_logits_at_any_batch_size(family, tmp_path):
    name, kwargs, size = FAMILIES[family]
    weights, model = write_weights(tmp_path / "w.safetensors", name, kwargs, img_size=size)
    result = export_run(weights)
    assert result.path == tmp_path / "w.onnx" and result.path.stat().st_size == result.size
    assert 0 <= result.max_diff <= result.tolerance and result.tolerance >= PARITY_TOLERANCE
    torch.manual_seed(1)
    for batch in (1, 5):  # 5: neither the traced batch (2) nor a checked one (1, 3)
        x = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            expected = model(x)
        got = run_onnx(result.path, x)
        assert got.shape == (batch, len(CLASSES))
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * max(1.0, expected.abs().max().item()))


def test_the_onnx_file_records_preprocessing_classes_and_source(exported):
    import onnx

    weights, path, _ = exported
    _, metadata = load_onnx(path)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["excite"]) == metadata  # plain JSON in metadata_props, readable without excite
    assert metadata["classes"] == CLASSES and metadata["img_size"] == 16 and metadata["preset"] == "cifar"
    mean, std = NORMALIZATION["cifar"]
    assert metadata["input"]["mean"] == list(mean) and metadata["input"]["std"] == list(std)
    assert metadata["input"]["name"] == "input" and metadata["output"]["name"] == "logits"
    assert metadata["model_name"] == "se_resnet20_cifar" and metadata["tta"] == "none"
    assert metadata["source"] == str(weights)
    assert metadata["source_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == ["batch", 3, 16, 16]  # only the batch is dynamic


def test_torch_export_round_trips(exported, tmp_path):
    weights, _, model = exported
    result = export_run(weights, out=tmp_path / "m.pt2", format="torch-export")
    assert result.max_diff <= result.tolerance
    program, metadata = load_torch_export(result.path)
    assert metadata == result.metadata and metadata["classes"] == CLASSES
    for batch in (1, 4):
        x = torch.randn(batch, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("format", ["onnx", "torch-export"])
def test_a_failed_parity_check_is_one_line_and_leaves_the_previous_file(format, exported, tmp_path, monkeypatch):
    weights = exported[0]
    real_fold = export_module.fold_batchnorm

    def broken_fold(model):  # a folding bug: every logit off by 0.5
        folded = copy.deepcopy(real_fold(model))
        with torch.no_grad():
            folded.fc.bias += 0.5
        return folded

    monkeypatch.setattr(export_module, "fold_batchnorm", broken_fold)
    out = tmp_path / ("m.onnx" if format == "onnx" else "m.pt2")
    out.write_bytes(b"previous")
    with pytest.raises(ExciteError, match=r"logits differ from PyTorch's by up to 0\.5 \(tolerance "):
        export_run(weights, out=out, format=format)
    assert out.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [out]  # no temporary file left


def test_without_onnx_packages_export_says_how_to_install_them(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what an uninstalled package looks like to import
    status, out, err = run_cli(["export", str(exported[0]), "--out", str(tmp_path / "m.onnx")], capsys)
    assert (status, out) == (2, "")
    assert err == ["excite: error: excite export needs onnx, onnxscript and onnxruntime: pip install "
                   "'excite[export]'"]
    assert not (tmp_path / "m.onnx").exists()


# The run's own inputs, or those pretrained weights give it (their mean, std and centre crop).
@pytest.mark.parametrize("inputs", [{}, {"mean": [0.3, 0.4, 0.5], "std": [0.2, 0.25, 0.3], "crop_pct": 0.8}])
def test_export_and_predict_onnx_agree_with_predict_on_a_trained_run(inputs, image_folder, tmp_path, capsys):
    from excite.train.config import TrainConfig
    from excite.train.fit import fit

    config = TrainConfig(model="resnet20_cifar", model_kwargs={"layers": [1, 1, 1], "widths": [4, 8, 8]},
                         data=str(image_folder), out=str(tmp_path / "run"), epochs=2, batch_size=8, img_size=16,
                         lr=0.05, seed=3, tta="flip", device="cpu", **inputs)
    run = fit(config, log=lambda *_: None, show_progress=False).run_dir
    status, out, err = run_cli(["export", str(run)], capsys)
    assert status == 0, err
    onnx_file = next(run.glob("*.onnx"))
    assert out.splitlines()[0].startswith(f"Wrote {onnx_file} (")
    assert "Parity: the exported model's logits are within " in out

    _, metadata = load_onnx(onnx_file)
    assert metadata["classes"] == CLASSES and metadata["tta"] == "flip"
    expected = list(predict(run, [image_folder], device="cpu"))
    got = list(predict_onnx(onnx_file, [image_folder]))
    assert [path for path, _ in got] == [path for path, _ in expected]
    for (_, top_got), (_, top_expected) in zip(got, expected):
        assert [name for name, _ in top_got] == [name for name, _ in top_expected]
        assert [p for _, p in top_got] == pytest.approx([p for _, p in top_expected], abs=1e-5)

    images = [str(image_folder / c / "000.png") for c in CLASSES]
    _, by_checkpoint, _ = run_cli(["predict", "--checkpoint", str(run), *images], capsys)
    status, by_onnx, err = run_cli(["predict", "--onnx", str(onnx_file), *images], capsys)
    assert status == 0 and err == [] and by_onnx == by_checkpoint and len(by_onnx.splitlines()) == 3


def test_an_onnx_file_without_excite_metadata_is_refused(exported, tmp_path, image_folder, capsys):
    import onnx

    model = onnx.load(str(exported[1]))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "plain.onnx"))
    status, out, err = run_cli(["predict", "--onnx", str(tmp_path / "plain.onnx"), str(image_folder)], capsys)
    assert (status, out) == (2, "")
    assert err == [f"excite: error: {tmp_path / 'plain.onnx'} has no excite metadata (classes, image size, "
                   "preprocessing): predict with ONNX files written by `excite export`"]


def bad_inputs(weights: Path, onnx_file: Path, tmp: Path) -> dict[str, tuple[list[str], str]]:
    """argv -> the start of its one error line."""
    image = str(tmp / "images" / "red" / "000.png")
    return {
        "missing run": (["export", str(tmp / "nowhere")], "excite: error: "),
        "bad format": (["export", str(weights), "--format", "tflite"], "excite export: error: argument --format"),
        "wrong suffix": (["export", str(weights), "--out", str(tmp / "m.pt2")],
                         f"excite: error: --out {tmp / 'm.pt2'} does not end with .onnx"),
        "opset for torch-export": (["export", str(weights), "--format", "torch-export", "--opset", "18"],
                                   "excite: error: --opset applies to --format onnx only"),
        "opset it cannot write": (["export", str(weights), "--opset", "9", "--out", str(tmp / "o.onnx")],
                                  "excite: error: torch's ONNX exporter cannot write se_resnet20_cifar in opset 9"),
        "not an onnx file": (["predict", "--onnx", str(weights), image],
                             f"excite: error: {weights} is not an ONNX model onnxruntime can run"),
        "missing onnx file": (["predict", "--onnx", str(tmp / "none.onnx"), image],
                              f"excite: error: ONNX file {tmp / 'none.onnx'} does not exist"),
        "onnx and checkpoint": (["predict", "--onnx", str(onnx_file), "--checkpoint", str(weights), image],
                                "excite predict: error: argument --checkpoint: not allowed with argument --onnx"),
        "onnx on a gpu": (["predict", "--onnx", str(onnx_file), "--device", "cuda", image],
                          "excite: error: --onnx runs on the CPU (onnxruntime): drop --device cuda"),
        "missing image": (["predict", "--onnx", str(onnx_file), str(tmp / "none.png")],
                          f"excite: error: {tmp / 'none.png'} does not exist"),
    }


@pytest.mark.parametrize("case", list(bad_inputs(Path("w"), Path("o"), Path("t"))))
def test_bad_input_is_one_line_and_exit_status_2(case, exported, image_folder, tmp_path, capsys):
    weights, onnx_file, _ = exported
    argv, start = bad_inputs(weights, onnx_file, image_folder.parent)[case]
    status, out, err = run_cli(argv, capsys)
    assert (status, out) == (2, "")
    assert len(err) == 1 and err[0].startswith(start), err
    assert not list(image_folder.parent.glob("*.onnx")) and not list(image_folder.parent.glob("*.pt2"))


def test_the_cpu_inference_benchmark_runs_and_writes_its_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("infer_cpu", Path(__file__).parents[1] / "bench" / "infer_cpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result"
    bench.main(["--model", "resnet20_cifar", "--model-arg", "layers=[1,1,1]", "--model-arg", "widths=[4,8,8]",
                "--img-size", "16", "--batch-size", "2", "--threads", "1", "--warmup", "1", "--iters", "2",
                "--repeats", "2", "--out", str(out)])
    result = json.loads((tmp_path / "result.json").read_text())
    assert list(result["results"]) == ["eager", "folded", "onnxruntime"]
    for r in result["results"].values():
        assert r["img_per_s"] > 0 and 0 < r["ms_min"] <= r["ms_median"]
    assert result["ratios"]["eager"] == 1.0
    assert result["ratios"]["onnxruntime"] == pytest.approx(
        result["results"]["onnxruntime"]["img_per_s"] / result["results"]["eager"]["img_per_s"], rel=1e-2)
    assert result["versions"]["onnxruntime"] == ort.__version__ and result["device"] and result["date"]
    assert result["threads"] == 1 and result["settings"]["batch_size"] == 2
    assert "| onnxruntime |" in capsys.readouterr().out and "| onnxruntime |" in (tmp_path / "result.md").read_text()
