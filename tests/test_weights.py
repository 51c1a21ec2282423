"""load_weights: torchvision's and timm's weights give the same outputs in excite; unsafe or unfit files are refused."""
from __future__ import annotations

import re

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from excite.errors import CheckpointError
from excite.models import create_model, load_weights

timm = pytest.importorskip("timm")


def _randomise_batchnorm(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine weights, so a misplaced one changes the output."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
    return model.eval()


def _assert_same_outputs(ours: nn.Module, theirs: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = theirs.eval()(x), ours.eval()(x)
    assert actual.shape == expected.shape
    assert ((actual - expected).norm() / expected.norm()).item() < 1e-5


@pytest.mark.parametrize("name,reference", [
    ("densenet121", lambda: torchvision.models.densenet121()),
    ("resnet50", lambda: torchvision.models.resnet50()),
    ("se_resnet50", lambda: timm.create_model("seresnet50")),
    ("densenet121", lambda: timm.create_model("densenet121")),
    ("dpn68", lambda: timm.create_model("dpn68")),
    ("dpn92", lambda: timm.create_model("dpn92")),
])
def test_reference_weights_give_reference_outputs(name: str, reference):
    theirs = _randomise_batchnorm(reference())
    ours = create_model(name)
    report = load_weights(ours, theirs.state_dict())
    assert not (report.missing or report.unexpected or report.mismatched or report.skipped_classifier)
    _assert_same_outputs(ours, theirs)


def test_torchvision_densenet_release_names():
    # torchvision's downloadable DenseNet files name "norm1" "norm.1"; its own loader renames them too.
    theirs = _randomise_batchnorm(torchvision.models.densenet121())
    old_name = lambda key: re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", key)  # noqa: E731
    old = {old_name(k): v for k, v in theirs.state_dict().items()}
    assert "features.denseblock1.denselayer1.norm.1.weight" in old
    ours = create_model("densenet121")
    load_weights(ours, old)
    _assert_same_outputs(ours, theirs)


def test_legacy_seresnet_names_map_with_a_warning():
    theirs = timm.create_model("legacy_seresnet50")
    ours = create_model("se_resnet50")
    with pytest.warns(UserWarning, match="legacy SENet"):
        report = load_weights(ours, theirs.state_dict())
    assert len(report.loaded) == len(theirs.state_dict())
    ours_sd = ours.state_dict()
    torch.testing.assert_close(ours_sd["conv1.weight"], theirs.layer0.conv1.weight)
    torch.testing.assert_close(ours_sd["layer4.2.attn.fc2.bias"], theirs.layer4[2].se_module.fc2.bias)
    torch.testing.assert_close(ours_sd["fc.weight"], theirs.last_linear.weight)


def test_se_weights_convert_between_linear_and_conv_forms():
    torch.manual_seed(0)
    conv_form = _randomise_batchnorm(create_model("resnet20_cifar", attn_layer="se"))
    linear_form = create_model("resnet20_cifar", attn_layer="se_linear")
    load_weights(linear_form, conv_form.state_dict())
    _assert_same_outputs(linear_form, conv_form)


def test_other_num_classes_keeps_all_but_the_classifier():
    source = torchvision.models.resnet18().state_dict()
    model = create_model("resnet18", num_classes=3)
    head_before = model.fc.weight.clone()
    with pytest.warns(UserWarning, match="classifier"):
        report = load_weights(model, source)
    assert sorted(report.skipped_classifier) == ["fc.bias", "fc.weight"]
    assert "classifier" in report.summary()
    assert torch.equal(model.fc.weight, head_before)
    for key, value in model.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, source[key]), key


def test_densenet_weights_into_se_densenet_leave_attention_at_init():
    source = create_model("densenet121").state_dict()
    model = create_model("se_densenet121")
    with pytest.warns(UserWarning, match="attention"):
        report = load_weights(model, source)
    assert len(report.left_at_init) == 6 + 12 + 24 + 16  # one SE per dense layer
    assert all(name.endswith(".attn") for name in report.left_at_init)
    assert report.left_at_init[0] in report.summary()
    assert len(report.loaded) == len(source)


def test_unfit_weights_are_refused_unless_not_strict():
    source = create_model("resnet18").state_dict()
    model = create_model("resnet34")
    with pytest.raises(CheckpointError, match=r"missing \(layer1\.2\."):
        load_weights(model, source)
    with pytest.warns(UserWarning, match="80 missing"):  # resnet34's extra blocks
        report = load_weights(model, source, strict=False)
    assert len(report.missing) == 80 and len(report.loaded) == len(source)


def test_safetensors_and_checkpoint_files_round_trip(tmp_path):
    source = _randomise_batchnorm(create_model("resnet20_cifar"))
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "last.pt")
    for file in ("w.safetensors", "last.pt"):
        model = create_model("resnet20_cifar")
        load_weights(model, tmp_path / file)
        for key, value in source.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (file, key)


class _Hostile:
    """Unpickling this calls open(path, "w"): the marker file shows whether any code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Hostile(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .* pickled code \(io.open\)"):
        load_weights(create_model("resnet20_cifar"), path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file is really hostile: a trusting load runs its payload
    assert marker.exists()


@pytest.mark.parametrize("name,content,message", [
    ("missing.pt", None, "does not exist"),
    ("garbage.pt", b"not a weights file", "not a PyTorch file"),
    ("garbage.safetensors", b"not a weights file", "not a valid safetensors file"),
])
def test_missing_or_corrupt_file(tmp_path, name: str, content: bytes | None, message: str):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_weights(create_model("resnet20_cifar"), tmp_path / name)


def test_truncated_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(create_model("resnet20_cifar").state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(create_model("resnet20_cifar"), path)


TINY_RESNET = dict(layers=(1, 1, 1), widths=(4, 8, 8), num_classes=3)


def _tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20_cifar", **TINY_RESNET)


def test_weights_of_which_nothing_fits_are_refused_naming_the_model_they_are_for(tmp_path):
    densenet = create_model("densenet_bc_100", block_config=(1, 1, 1), growth_rate=4, num_classes=3)
    save_file(densenet.state_dict(), tmp_path / "densenet.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_weights(_tiny_resnet(), tmp_path / "densenet.safetensors", strict=False)
    message = str(err.value)
    assert message.startswith(f"nothing in {tmp_path / 'densenet.safetensors'} fits resnet20_cifar outside its "
                              "classifier (")
    assert "the file's layout: excite/torchvision/timm, its first keys: classifier.bias, classifier.weight, " in message
    assert message.endswith("its tensors are named as a DenseNet's: load it into one of those models (densenet121, "
                            "densenet169, se_densenet121, resdense_j4, or densenet_bc_100 for small images)")

    # A file excite wrote says which model it holds.
    from excite.train.checkpoint import save_weights
    save_weights(tmp_path / "best.safetensors", {"model": densenet.state_dict(), "model_name": "densenet_bc_100",
                                                 "model_kwargs": {}, "classes": ["a", "b", "c"], "img_size": 32,
                                                 "preset": "cifar"})
    with pytest.raises(CheckpointError, match=r"it holds the weights of densenet_bc_100: load it into that model "
                                              r"\(--model densenet_bc_100\)$"):
        load_weights(_tiny_resnet(), tmp_path / "best.safetensors", strict=False)


def test_integer_weights_are_never_loaded_into_float_parameters():
    source = _tiny_resnet().state_dict()
    as_int8 = {k: v.to(torch.int8) if v.is_floating_point() else v for k, v in source.items()}
    with pytest.raises(CheckpointError, match=r"with another shape or type \(conv1.weight torch.int8 vs torch.float32"):
        load_weights(_tiny_resnet(), as_int8)
    with pytest.raises(CheckpointError, match="nothing in the given state dict fits resnet20_cifar"):
        load_weights(_tiny_resnet(), as_int8, strict=False)

    one_int8 = {**source, "conv1.weight": source["conv1.weight"].to(torch.int8)}
    model = create_model("resnet20_cifar", **TINY_RESNET)
    before = model.conv1.weight.clone()
    with pytest.warns(UserWarning, match="not loaded: 1 with another shape or type"):
        report = load_weights(model, one_int8, strict=False)
    assert report.mismatched == ["conv1.weight torch.int8 vs torch.float32"]
    assert torch.equal(model.conv1.weight, before) and torch.equal(model.fc.weight, source["fc.weight"])


def test_pretrained_weights_that_load_nothing_stop_the_run(image_folder, tmp_path, capsys):
    from excite.cli import main
    torch.save({"features.denseblock1.denselayer1.conv1.weight": torch.zeros(4, 4, 1, 1)}, tmp_path / "other.pt")
    run = tmp_path / "run"
    status = main(["train", "--model", "resnet20_cifar", "--model-arg", "widths=[4,8,8]", "--data", str(image_folder),
                   "--out", str(run), "--epochs", "1", "--batch-size", "8", "--img-size", "16",
                   "--pretrained", str(tmp_path / "other.pt")])
    err = capsys.readouterr().err.splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(f"excite: error: nothing in {tmp_path / 'other.pt'} "
                                                               "fits resnet20_cifar"), err
    assert not (run / "last.pt").exists()
