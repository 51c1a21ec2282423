"""`excite summary` and `summary()`: the model's own defaults, builder arguments, runs, units and memory estimates."""
import json
import re

import pytest
import torch
from torch import nn

from excite.cli import main
from excite.models import create_model, summary
from excite.models.summary import format_count
from excite.train.config import TrainConfig
from excite.train.fit import fit

RUN_KWARGS = {"widths": [8, 16, 32]}  # a narrow resnet20_cifar, so that a wrong rebuild shows in the count


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _total_params(out: str) -> int:
    return int(re.search(r"Total params: ([\d,]+)", out).group(1).replace(",", ""))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_image_folder):
    """A one-epoch run of a narrow resnet20_cifar on 3 classes of 16x16 images."""
    root = tmp_path_factory.mktemp("summary")
    config = TrainConfig(model="resnet20_cifar", model_kwargs=dict(RUN_KWARGS), data=str(make_image_folder(root / "d")),
                         img_size=16, epochs=1, batch_size=8, device="cpu", out=str(root / "run"))
    fit(config, log=lambda _: None)
    return root / "run"


def test_summary_keeps_the_models_own_number_of_classes(capsys):
    assert main(["summary", "resnet20_cifar", "--img-size", "32", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert _total_params(out) == 272_474 == _params(create_model("resnet20_cifar"))  # its 10 CIFAR classes
    assert "fc (Linear)" in out and "1x10" in out
    assert main(["summary", "resnet20_cifar", "--img-size", "32", "--num-classes", "100", "--depth", "1"]) == 0
    assert _total_params(capsys.readouterr().out) == _params(create_model("resnet20_cifar", num_classes=100))


def test_summary_takes_model_args(capsys):
    assert main(["summary", "densenet121", "--model-arg", "growth_rate=12", "--model-arg", "block_config=[2,2]",
                 "--img-size", "32", "--depth", "1"]) == 0
    expected = _params(create_model("densenet121", growth_rate=12, block_config=[2, 2]))
    assert _total_params(capsys.readouterr().out) == expected


def test_summary_bad_model_arg_is_one_line(capsys):
    assert main(["summary", "resnet18", "--model-arg", "block=basik"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "block must be one of basic, bottleneck, got 'basik'" in err


@pytest.mark.parametrize("target", ["", "last.pt", "best.safetensors"])
def test_summary_of_a_run_rebuilds_its_model(run_dir, target, capsys):
    assert main(["summary", str(run_dir / target), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert _total_params(out) == _params(create_model("resnet20_cifar", num_classes=3, **RUN_KWARGS))
    assert "Input shape: 1x3x16x16" in out  # the run's image size


def test_summary_of_a_run_refuses_model_options(run_dir, capsys):
    assert main(["summary", str(run_dir), "--num-classes", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--num-classes cannot change the model of a run" in err


@pytest.mark.parametrize("flag", ["--img-size", "--batch-size"])
def test_summary_sizes_must_be_positive(flag, capsys):
    assert main(["summary", "resnet20_cifar", flag, "0"]) == 2
    assert f"{flag} must be at least 1, got 0" in capsys.readouterr().err


def test_summary_of_a_missing_run_is_one_line(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-run" in err and "unknown model" not in err


@pytest.mark.parametrize("n, text", [(0, "0"), (999, "999"), (1000, "1.00 K"), (40_813_184, "40.8 M"),
                                     (999_600, "1.00 M"), (9_996_000, "10.0 M"), (2_830_000_000, "2.83 G"),
                                     (123_456_789_012, "123 G")])
def test_counts_have_three_significant_digits_in_a_fitting_unit(n, text):
    assert format_count(n) == text


def test_totals_use_a_fitting_unit_and_mib():
    out = str(summary(create_model("resnet20_cifar"), img_size=32))
    assert "Total MACs: 40.8 M" in out
    assert "Params size (MiB): 1.04" in out  # 272,474 float32 parameters: 1,089,896 bytes
    assert "(MB)" not in out


def test_forward_backward_size_counts_leaf_layers_with_parameters_twice():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10))
    s = summary(model, img_size=8, batch_size=5)
    # conv and BN each give 5x4x8x8 floats, the Linear 5x10; the ReLU and Flatten have no parameters.
    assert s.activation_bytes == 2 * 4 * 5 * (256 + 256 + 10)
    assert s.input_shape == (5, 3, 8, 8) and s.input_bytes == 5 * 3 * 8 * 8 * 4
    assert s.total_bytes == s.input_bytes + s.activation_bytes + s.param_bytes
    assert summary(model, img_size=8, batch_size=1).activation_bytes * 5 == s.activation_bytes
    out = str(s)
    assert "Forward/backward pass size (MiB, estimate): " in out and "Estimated total size (MiB): " in out


def test_batch_size_flag(capsys):
    assert main(["summary", "resnet20_cifar", "--img-size", "32", "--batch-size", "8", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "Input shape: 8x3x32x32" in out and "Total MACs: 327 M" in out  # 8 x 40.8 M


def test_to_dict_is_json_ready():
    s = summary(create_model("resnet20_cifar"), img_size=32)
    d = json.loads(json.dumps(s.to_dict()))
    assert d == {"model": "resnet20_cifar", "input_shape": [1, 3, 32, 32], "total_params": 272_474,
                 "trainable_params": 272_474, "total_macs": s.total_macs, "input_bytes": 12_288,
                 "param_bytes": 1_089_896, "activation_bytes": s.activation_bytes}
    assert s.total_macs == 40_813_184 and s.activation_bytes > 0


def test_summary_reads_the_input_channels_from_the_model():
    model = create_model("resnet20_cifar", in_chans=1).train()
    s = summary(model, img_size=32)
    assert s.input_shape == (1, 1, 32, 32)
    assert model.training  # left in the mode it was in
    assert summary(model, img_size=32, in_chans=1).total_macs == s.total_macs
    assert next(model.parameters()).device == torch.device("cpu")
