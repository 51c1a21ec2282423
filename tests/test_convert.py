"""excite convert: an excite model's weights in torchvision's or timm's layout give the peer excite's outputs, the
peer's weights load back; models without a peer, and bad input, are one line. Also DenseNet's features ending in
norm5 as torchvision's do, and older checkpoints that named SE on the final features features.attn."""
import re

import pytest
import torch
import torchvision
from torch import nn

from excite.cli import main
from excite.errors import CheckpointError, ExciteError
from excite.models import create_model, load_weights
from excite.models.convert import PEERS, build_peer, convert_run, convert_state_dict
from excite.train.checkpoint import model_from_checkpoint, save_weights

timm = pytest.importorskip("timm")

NUM_CLASSES = 3
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def randomised(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorm statistics and affine parameters away from their identity init, and
    non-zero biases, so that a tensor loaded into the wrong place changes the output."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for t, low, high in ((module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5),
                                     (module.weight, 0.5, 1.5), (module.bias, -0.2, 0.2)):
                    t.copy_(torch.rand(t.shape, generator=generator) * (high - low) + low)
            elif isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
    return model.eval()


# Each family and each library once, small members where the family has them.
CASES = [("resnet18", "torchvision", "resnet18"), ("resnet18", "timm", "resnet18"),
         ("se_resnet18", "timm", "seresnet18"), ("se_resnet50", "timm", "seresnet50"),
         ("densenet121", "torchvision", "densenet121"), ("densenet121", "timm", "densenet121"),
         ("dpn68", "timm", "dpn68")]


@pytest.mark.parametrize("name,to,peer_name", CASES)
def test_the_peer_computes_excite_s_function_and_its_weights_load_back(name, to, peer_name):
    torch.manual_seed(0)
    ours = randomised(create_model(name, num_classes=NUM_CLASSES))
    peer_got, state = convert_state_dict(ours, to)
    assert peer_got == peer_name
    peer = build_peer(to, peer_name, NUM_CLASSES).eval()
    peer.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = ours(X)
        torch.testing.assert_close(peer(X), expected, atol=1e-5, rtol=1e-5)
    # And back: the peer's own state dict loads into a fresh excite model, which then gives the same outputs.
    back = create_model(name, num_classes=NUM_CLASSES).eval()
    report = load_weights(back, peer.state_dict())
    assert not report.problems and not report.left_at_init
    with torch.no_grad():
        torch.testing.assert_close(back(X), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,to", [(name, to) for name, peers in PEERS.items() for to in peers])
def test_every_listed_peer_has_exactly_the_converted_names_and_shapes(name, to):
    with torch.device("meta"):  # names and shapes only: the big models cost nothing
        model = create_model(name, num_classes=NUM_CLASSES)
    peer, state = convert_state_dict(model, to)
    target = build_peer(to, peer, NUM_CLASSES, "meta").state_dict()
    assert list(state) == list(target)
    assert all(state[key].shape == target[key].shape for key in target)


def test_se_in_linear_form_becomes_timm_s_1x1_convolutions():
    ours = randomised(create_model("se_resnet18", num_classes=NUM_CLASSES, attn_layer="se_linear"))
    _, state = convert_state_dict(ours, "timm")
    assert state["layer1.0.se.fc1.weight"].shape == (8, 64, 1, 1)
    peer = timm.create_model("seresnet18", pretrained=False, num_classes=NUM_CLASSES).eval()
    peer.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(peer(X), ours(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kwargs,to,message", [
    ("se_densenet121", {}, "torchvision",
     r"^se_densenet121 has no counterpart in torchvision with the same architecture, so its weights cannot be "
     r"written in torchvision's layout; the models that convert: to torchvision resnet18/34/50/101/152, "
     r"densenet121/161/169/201; to timm resnet18/34/50/101/152, se_resnet18/34/50/101/152, densenet121/161/169/201, "
     r"dpn68/92$"),
    ("resnet20_cifar", {}, "timm", r"^resnet20_cifar has no counterpart in timm "),
    ("se_resnet50", {}, "torchvision", r"; use --to timm \(seresnet50\)$"),
    ("resnet18", {"attn_layer": "eca"}, "timm",
     r"^resnet18 built with \{'num_classes': 3, 'attn_layer': 'eca'\} is not timm's resnet18, whose tensors it lacks "
     r"or does not fit: 8 unexpected \(layer1\.0\.attn\.conv\.weight, "),
    ("resnet18", {"widths": (32, 64, 128, 256)}, "torchvision", r"with another shape \(conv1\.weight, bn1\.weight, "),
    ("resnet18", {"in_chans": 1}, "timm", r": 1 with another shape \(conv1\.weight\); only the model's own "),
])
def test_a_model_without_a_peer_of_its_architecture_is_one_line(name, kwargs, to, message):
    with torch.device("meta"):
        model = create_model(name, num_classes=NUM_CLASSES, **kwargs)
    with pytest.raises(ExciteError, match=message) as caught:
        convert_state_dict(model, to)
    assert "\n" not in str(caught.value)


@pytest.fixture
def run(tmp_path):
    """A run directory of a trained-looking (randomised) SE-ResNet-18 for 3 classes."""
    torch.manual_seed(0)
    model = randomised(create_model("se_resnet18", num_classes=NUM_CLASSES))
    (tmp_path / "run").mkdir()
    write_weights(tmp_path / "run" / "best.safetensors", model, "se_resnet18")
    return tmp_path / "run", model


def write_weights(path, model: nn.Module, name: str) -> None:
    save_weights(path, {"model": model.state_dict(), "model_name": name, "model_kwargs": {"num_classes": NUM_CLASSES},
                        "classes": ["a", "b", "c"], "img_size": 64, "preset": "imagenet"})


def cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_convert_writes_a_file_that_the_printed_line_loads(run, capsys):
    run_dir, model = run
    status, out, err = cli(["convert", str(run_dir), "--to", "timm"], capsys)
    path = run_dir / "seresnet18-timm.safetensors"
    assert status == 0 and err == ""
    assert out.startswith(f"Wrote {path} in timm's seresnet18 layout; load it with timm.create_model('seresnet18', ")
    # The printed line, run as it is, builds timm's model with the run's weights, classifier included.
    namespace = {"timm": timm}
    peer = eval(out.split("load it with ", 1)[1].strip(), namespace).eval()
    with torch.no_grad():
        torch.testing.assert_close(peer(X), model(X), atol=1e-5, rtol=1e-5)
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.safetensors", "seresnet18-timm.safetensors"]


def test_convert_to_torchvision_as_pth(tmp_path, capsys):
    model = randomised(create_model("densenet121", num_classes=NUM_CLASSES))
    write_weights(tmp_path / "best.safetensors", model, "densenet121")
    out_file = tmp_path / "tv.pth"
    status, out, _ = cli(["convert", str(tmp_path / "best.safetensors"), "--to", "torchvision", "--out",
                          str(out_file)], capsys)
    assert status == 0
    line = out.split("load it with ", 1)[1].strip()
    assert line == (f"model = torchvision.models.densenet121(num_classes=3); "
                    f"model.load_state_dict(torch.load({str(out_file)!r}, weights_only=True))")
    namespace = {"torchvision": torchvision, "torch": torch}
    exec(line, namespace)
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"].eval()(X), model(X), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("args,message", [
    (["--to", "torchvision"], r"^excite: error: se_resnet18 has no counterpart in torchvision .*; use --to timm "
                              r"\(seresnet18\)$"),
    (["--to", "timm", "--out", "{run}/w.onnx"], r"^excite: error: --out .*w\.onnx must end in \.safetensors, \.pth, "
                                                r"\.pt$"),
    (["--to", "timm", "--out", "{run}/no/such/w.pth"], r"^excite: error: --out .*: the folder .*no/such does not "
                                                       r"exist$"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, capsys, args, message):
    run_dir, _ = run
    status, out, err = cli(["convert", str(run_dir), *[a.format(run=run_dir) for a in args]], capsys)
    assert status == 2 and out == "" and len(err.splitlines()) == 1
    assert re.match(message, err.strip()), err
    assert [p.name for p in run_dir.iterdir()] == ["best.safetensors"]


def test_a_missing_run_or_library_is_one_line(tmp_path, capsys):
    status, _, err = cli(["convert", str(tmp_path / "nothing"), "--to", "timm"], capsys)
    assert status == 2 and len(err.splitlines()) == 1 and "nothing" in err
    with pytest.raises(SystemExit) as caught:  # argparse's own one line
        main(["convert", str(tmp_path), "--to", "onnx"])
    assert caught.value.code == 2
    with pytest.raises(ExciteError, match=r"^cannot convert to 'onnx': choose torchvision or timm$"):
        convert_run(tmp_path, "onnx")


# DenseNet's features end in norm5, as torchvision's do.

def test_densenet_features_end_in_norm5_like_torchvision_s():
    ours = randomised(create_model("densenet121", num_classes=NUM_CLASSES))
    theirs = randomised(torchvision.models.densenet121(num_classes=NUM_CLASSES))
    theirs.load_state_dict(ours.state_dict())
    assert isinstance(ours.features[-1], nn.BatchNorm2d) and ours.features[-1] is ours.features.norm5
    seen = {}
    for key, model in (("ours", ours), ("theirs", theirs)):
        # clone: torchvision's ReLU after norm5 is in place and would overwrite a kept reference
        model.features[-1].register_forward_hook(lambda _m, _i, out, key=key: seen.__setitem__(key, out.clone()))
    with torch.no_grad():
        torch.testing.assert_close(ours.features(X), theirs.features(X))
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)
        features, maps = ours.forward_intermediates(X)
    torch.testing.assert_close(seen["ours"], seen["theirs"])
    assert (seen["ours"] < 0).any()  # the BatchNorm's output, before the ReLU
    assert ours.feature_info[-1]["module"] == "features.norm5"
    torch.testing.assert_close(maps[-1], seen["ours"])
    torch.testing.assert_close(features, seen["ours"].relu())


def old_layout(state: dict) -> dict:
    """A state dict as excite wrote it before features ended in norm5: SE on the final features in features.attn."""
    return {re.sub(r"^attn\.", "features.attn.", key): value for key, value in state.items()}


def test_older_checkpoints_with_se_on_the_final_features_still_load(tmp_path):
    kwargs = {"num_classes": NUM_CLASSES, "se_placement": "final", "block_config": (1, 1), "growth_rate": 4,
              "num_init_features": 8}
    model = randomised(create_model("se_densenet121", **kwargs))
    old = old_layout(model.state_dict())
    assert "features.attn.fc1.weight" in old and "attn.fc1.weight" not in old
    with torch.no_grad():
        expected = model(X)
    loaded = create_model("se_densenet121", **kwargs).eval()
    report = load_weights(loaded, old)
    assert not report.problems and not report.left_at_init
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), expected)
    # A run's weights file (eval, predict, convert) and a checkpoint rebuilt by model_from_checkpoint.
    ckpt = {"model": old, "model_name": "se_densenet121", "model_kwargs": kwargs, "classes": ["a", "b", "c"],
            "img_size": 64, "preset": "imagenet"}
    rebuilt, _ = model_from_checkpoint(ckpt)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(X), expected)
    # The parameters keep their order, which a resumed optimizer's state relies on.
    assert [p.shape for p in rebuilt.parameters()] == [old[k].shape for k in old if not k.endswith(
        ("running_mean", "running_var", "num_batches_tracked"))]
    with pytest.raises(CheckpointError):  # a renamed tensor that does not fit is still refused
        model_from_checkpoint({**ckpt, "model": {**old, "features.attn.fc1.weight": torch.zeros(1)}})
