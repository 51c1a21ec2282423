"""Weights saved by other tools load as safely as excite's own: a Lightning ``.ckpt`` (the model under
``state_dict`` with the LightningModule's attribute as a prefix), timm's ``model_best.pth.tar`` (which pickles its
``argparse.Namespace`` of arguments), DataParallel/DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes;
a hostile pickle in the same wrapper is still refused, and a model object where a state dict belongs is one line."""
import argparse
import os

import pytest
import torch

from excite.errors import CheckpointError
from excite.models import create_model, load_weights

TINY = dict(layers=(1, 1, 1), widths=(4, 8, 8), num_classes=3)


def source_and_target():
    torch.manual_seed(0)
    source = create_model("se_resnet20_cifar", **TINY)
    torch.manual_seed(1)
    return source, create_model("se_resnet20_cifar", **TINY)


def assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def prefixed(state, prefix):
    return {prefix + key: value for key, value in state.items()}


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def lightning_ckpt(state):
    return {"epoch": 3, "global_step": 120, "pytorch-lightning_version": "2.4.0",
            "state_dict": prefixed(state, "model."),
            "loops": {}, "callbacks": {}, "optimizer_states": [], "lr_schedulers": [], "hparams_name": "kwargs",
            "hyper_parameters": {"lr": 0.1, "model": "se_resnet20_cifar"}}


def timm_checkpoint(state):
    args = argparse.Namespace(model="seresnet20", lr=0.1, epochs=3, amp=True, mean=None, input_size=[3, 32, 32])
    return {"epoch": 2, "arch": "seresnet20", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
            "version": 2, "args": args, "metric": 71.5}


@pytest.mark.parametrize("wrap, name", [
    (lightning_ckpt, "last.ckpt"),
    (timm_checkpoint, "model_best.pth.tar"),
    (lambda state: prefixed(state, "module."), "ddp.pth"),
    (lambda state: prefixed(state, "_orig_mod."), "compiled.pth"),
    (lambda state: {"state_dict": prefixed(state, "module.")}, "dataparallel.pth"),
])
def test_other_tools_checkpoints_load(tmp_path, wrap, name):
    source, target = source_and_target()
    torch.save(wrap(source.state_dict()), tmp_path / name)
    report = load_weights(target, tmp_path / name)
    assert not report.problems
    assert_same_weights(target, source)


@pytest.mark.parametrize("wrap", [lightning_ckpt, timm_checkpoint])
def test_a_hostile_pickle_in_the_same_wrapper_is_still_refused(tmp_path, wrap):
    source, target = source_and_target()
    checkpoint = wrap(source.state_dict())
    checkpoint["hyper_parameters" if "hyper_parameters" in checkpoint else "args"] = _Hostile(tmp_path / "pwned")
    torch.save(checkpoint, tmp_path / "hostile.pt")
    with pytest.raises(CheckpointError, match=r"refusing to load .* pickled code"):
        load_weights(target, tmp_path / "hostile.pt")
    assert not (tmp_path / "pwned").exists()


class Sneaky(argparse.Namespace):
    """Not argparse.Namespace itself: its own class, which weights-only loading must still refuse."""


def test_a_namespace_subclass_is_not_let_through(tmp_path):
    source, target = source_and_target()
    checkpoint = timm_checkpoint(source.state_dict())
    checkpoint["args"] = Sneaky(lr=0.1)
    torch.save(checkpoint, tmp_path / "sneaky.pth.tar")
    with pytest.raises(CheckpointError, match=r"refusing to load .* pickled code"):
        load_weights(target, tmp_path / "sneaky.pth.tar")


def test_a_model_object_instead_of_a_state_dict_is_one_line(tmp_path):
    source, target = source_and_target()
    with pytest.raises(CheckpointError, match=r"^got a SEResNet|^got a ResNet") as error:
        load_weights(target, source)
    assert "state_dict()" in str(error.value) and "\n" not in str(error.value)


def test_create_model_takes_pretrained_weights_or_says_in_one_line_what_it_needs(tmp_path):
    source, _ = source_and_target()
    torch.save(lightning_ckpt(source.state_dict()), tmp_path / "last.ckpt")
    model = create_model("se_resnet20_cifar", pretrained=tmp_path / "last.ckpt", **TINY)
    assert_same_weights(model, source)
    assert "pretrained" not in model.model_kwargs  # a checkpoint rebuilds the model without reloading the file
    with pytest.warns(UserWarning, match="classifier"):  # another number of classes: the head starts fresh
        other = create_model("se_resnet20_cifar", pretrained=source.state_dict(), **{**TINY, "num_classes": 5})
    assert torch.equal(other.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match=r"^pretrained=True cannot say which weights") as error:
        create_model("se_resnet20_cifar", pretrained=True)
    assert "\n" not in str(error.value)
