"""The gate analysis (excite.explain.excitation, `excite excitation`): every attention layer's gates recorded with
the right shapes and per-class numbers, gates replaced by their mean equal to a hand-built constant gate, and
a model without attention told so in one line."""
import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from excite.cli import main
from excite.explain import NoAttention, attention_layers, excitation_stats, replaced_gate_accuracy
from excite.explain.excitation import mean_gates
from excite.models import create_model
from excite.train.config import TrainConfig
from excite.train.fit import fit

TINY_RESNET = dict(layers=(1, 1, 1), widths=(8, 16, 16), num_classes=3)
CLASSES = ["a", "b", "c"]


def batches(n_batches=3, batch=6, side=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, side, side, generator=generator), torch.arange(batch) % 3)
            for _ in range(n_batches)]


def perturbed(model: nn.Module) -> nn.Module:
    """The model with random weights everywhere, so gates and BatchNorm statistics differ between layers."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name, kwargs, kind", [
    ("resnet20_cifar", {**TINY_RESNET, "attn_layer": "se"}, "SqueezeExcite"),
    ("resnet20_cifar", {**TINY_RESNET, "attn_layer": "se_linear"}, "SqueezeExcite"),
    ("resnet20_cifar", {**TINY_RESNET, "attn_layer": "eca"}, "EfficientChannelAttention"),
    ("resnet20_cifar", {**TINY_RESNET, "attn_layer": "cbam"}, "CBAM"),
    ("se_densenet_bc_100", {"block_config": (2, 2, 2), "growth_rate": 4, "num_classes": 3}, "SqueezeExcite"),
    ("se_densenet_bc_100", {"block_config": (2, 2, 2), "growth_rate": 4, "num_classes": 3,
                            "se_placement": "block"}, "SqueezeExcite"),
    ("se_densenet_bc_100", {"block_config": (2, 2, 2), "growth_rate": 4, "num_classes": 3,
                            "se_placement": "final"}, "SqueezeExcite"),
])
def test_every_attention_layer_is_recorded_with_its_channel_count_and_stage(name, kwargs, kind):
    torch.manual_seed(0)
    model = perturbed(create_model(name, **kwargs))
    stats = excitation_stats(model, batches(), CLASSES)
    layers = attention_layers(model)
    assert [layer.name for layer in stats.layers] == [name for name, _ in layers]
    for layer, (_, module) in zip(stats.layers, layers):
        assert layer.kind == kind
        # The gate has one value per channel of the features the layer scales: its input's channels.
        features = []
        handle = module.register_forward_pre_hook(lambda _m, args: features.append(args[0].shape[1]) and None)
        model(batches(1)[0][0])
        handle.remove()
        assert layer.class_mean.shape == layer.class_std.shape == (3, features[0])
        assert np.isfinite(layer.class_mean).all() and ((layer.class_mean >= 0) & (layer.class_mean <= 1)).all()
        assert list(layer.count) == [6, 6, 6]
    # Stages follow the feature-map size, shallow (16x16) to deep.
    resolutions = [layer.resolution for layer in stats.layers]
    assert [layer.stage for layer in stats.layers] == sorted(layer.stage for layer in stats.layers)
    assert sorted(stats.stages()) == list(range(len(set(resolutions))))


def test_per_class_numbers_equal_a_hand_computation():
    torch.manual_seed(0)
    model = perturbed(create_model("resnet20_cifar", **TINY_RESNET, attn_layer="se"))
    data = batches()
    stats = excitation_stats(model, data, CLASSES)
    # Record the first stage's last gate by hand, image by image.
    module = dict(attention_layers(model))[stats.layers[0].name]
    seen = []
    handle = module.gate.register_forward_hook(lambda _m, _a, out: seen.append(out.flatten(1)))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    handle.remove()
    gates = torch.cat(seen).double().numpy()
    labels = torch.cat([y for _, y in data]).numpy()
    for k in range(3):
        np.testing.assert_allclose(stats.layers[0].class_mean[k], gates[labels == k].mean(0), rtol=1e-9)
        np.testing.assert_allclose(stats.layers[0].class_std[k], gates[labels == k].std(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.layers[0].mean, gates.mean(0), rtol=1e-9)
    layer = stats.layers[0]
    between, within = layer.class_mean.std(0), layer.class_std.mean(0)
    assert layer.specificity == pytest.approx(float(np.mean(between / within)))


class ConstantGate(nn.Module):
    """An SE layer's stand-in that scales each channel by a fixed number, whatever the input."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.register_buffer("values", torch.as_tensor(values, dtype=torch.float32)[None, :, None, None])

    def forward(self, x):
        return x * self.values


def test_mean_gates_equal_a_model_built_with_constant_gates():
    torch.manual_seed(0)
    model = perturbed(create_model("resnet20_cifar", **TINY_RESNET, attn_layer="se"))
    stats = excitation_stats(model, batches(), CLASSES)
    stage = 1
    hand_built = copy.deepcopy(model)
    for layer in stats.stages()[stage]:
        parent_name, child = layer.name.rsplit(".", 1)
        setattr(hand_built.get_submodule(parent_name), child, ConstantGate(layer.mean))
    x = batches(1, seed=5)[0][0]
    with torch.no_grad():
        expected, untouched = hand_built(x), model(x)
        with mean_gates(model, stats, stage):
            replaced = model(x)
        after = model(x)
    torch.testing.assert_close(replaced, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(replaced, untouched, atol=1e-4)  # the stage's gates did change something
    torch.testing.assert_close(after, untouched)  # and the hooks are gone afterwards
    data = batches(seed=5)
    expected_acc = np.mean([(hand_built(x).argmax(1) == y).float().mean().item() for x, y in data])
    assert replaced_gate_accuracy(model, data, stats, stage) == pytest.approx(expected_acc)


def test_a_model_without_attention_is_one_line(tmp_path, capsys, image_folder):
    with pytest.raises(NoAttention, match="no attention layers"):
        excitation_stats(create_model("resnet20_cifar", **TINY_RESNET), batches(), CLASSES)
    run = tmp_path / "plain"
    fit(TrainConfig(model="resnet20_cifar", model_kwargs={"layers": [1, 1, 1], "widths": [4, 8, 8]},
                    data=str(image_folder), out=str(run), epochs=1, batch_size=8, img_size=16, seed=0),
        log=lambda _: None)
    capsys.readouterr()
    assert main(["excitation", str(run), "--data", str(image_folder)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no attention layers" in err[0] and "se_resnet20_cifar" in err[0]
    assert not (run / f"excitation-{image_folder.name}").exists()


def test_excitation_command_writes_figures_numbers_and_a_page(tmp_path, capsys, image_folder):
    run = tmp_path / "se"
    fit(TrainConfig(model="se_resnet20_cifar", model_kwargs={"layers": [1, 1, 1], "widths": [8, 16, 16]},
                    data=str(image_folder), out=str(run), epochs=2, batch_size=8, img_size=16, seed=0, lr=0.05),
        log=lambda _: None)
    assert main(["excitation", str(run), "--data", str(image_folder), "--split", "all"]) == 0
    out = run / f"excitation-{image_folder.name}"  # beside the checkpoint, where excite compare finds it
    result = json.loads((out / "excitation.json").read_text())
    assert result["images"] == 36 and result["split"] == "all"
    assert len(result["layers"]) == 3 and [row["layers"] for row in result["stages"]] == [1, 1, 1]
    assert all(0 <= row["accuracy_with_mean_gates"] <= 1 for row in result["stages"])
    for png in ("excitation.png", "specificity.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "excitation.html").read_text()
    assert "What the attention learned" in page and page.count("data:image/png;base64") == 2
    printed = capsys.readouterr().out
    assert "stage 3 (4x4)" in printed and "accuracy with mean gates" in printed

    # The run's comparison report carries the analysis as a section.
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    report = (tmp_path / "cmp" / "report.html").read_text()
    assert "What the attention learned: se" in report and "accuracy with mean gates" in report
