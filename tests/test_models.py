"""Every registered model builds, runs and trains; the families agree with the literature's sizes and costs."""
from __future__ import annotations

import inspect

import pytest
import torch

from excite.errors import ExciteError, UnknownModelError
from excite.models import DPN, DenseNet, ResDense, ResNet, create_model, list_models, summary
from excite.models._registry import get_model_builder
from excite.models.names import MODEL_NAMES
from excite.nn.attention import CBAM, EfficientChannelAttention, SqueezeExcite


def _input_size(name: str) -> int:
    # CIFAR-stem models downsample 4x and ImageNet-stem ones 32x (32x32 is their smallest input: 1x1 at
    # the end); 64x64 keeps a 2x2 final map and is still fast.
    return 32 if name.endswith("_cifar") or "densenet_bc" in name else 64


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains(name: str):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3)
    size = _input_size(name)
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 3)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without a gradient: {no_grad[:5]}"


PARAM_COUNTS = {  # torchvision / timm / the tutorial, at 1000 classes unless given
    ("densenet121", 1000): 7_978_856,
    ("densenet169", 1000): 14_149_480,
    ("densenet201", 1000): 20_013_928,
    ("densenet161", 1000): 28_681_000,
    ("resnet18", 1000): 11_689_512,
    ("resnet50", 1000): 25_557_032,
    ("resnet152", 1000): 60_192_808,
    ("se_resnet50", 1000): 28_088_024,
    ("dpn68", 1000): 12_611_602,
    ("dpn92", 1000): 37_668_392,
    ("resdense_j4", 2): 149_871_874,
}


@pytest.mark.parametrize("name,num_classes", list(PARAM_COUNTS))
def test_param_counts(name: str, num_classes: int):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = create_model(name, num_classes=num_classes)
    assert sum(p.numel() for p in model.parameters()) == PARAM_COUNTS[name, num_classes]


@pytest.mark.parametrize("name,gmacs", [("densenet121", 2.83), ("resnet50", 4.09)])
def test_macs_at_224(name: str, gmacs: float):
    model = create_model(name)
    s = summary(model, img_size=224)
    assert s.total_macs / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert f"Total MACs: {gmacs:.2f} G" in str(s)


def test_summary_depth_limits_rows():
    model = create_model("se_resnet20_cifar")
    shallow, deep = summary(model, img_size=32, depth=1), summary(model, img_size=32, depth=4)
    assert [r.name for r in shallow.rows] == ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "fc"]
    assert shallow.rows[-1].output_shape == (1, 10)
    names = [r.name for r in deep.rows]
    assert "layer1.0.attn" in names and not any(".attn." in n for n in names)  # attention is one row
    # A container's MACs are its children's: layer1 = its blocks.
    macs = {r.name: r.macs for r in deep.rows}
    assert macs["layer1"] == sum(macs[f"layer1.{i}"] for i in range(3)) > 0


def test_se_linear_equals_conv_form():
    torch.manual_seed(0)
    conv, linear = SqueezeExcite(32, form="conv"), SqueezeExcite(32, form="linear")
    linear.load_state_dict({k: v.flatten(1) if v.ndim == 4 else v for k, v in conv.state_dict().items()})
    x = torch.randn(2, 32, 5, 5)
    torch.testing.assert_close(linear(x), conv(x))


@pytest.mark.parametrize("layer", [EfficientChannelAttention, CBAM])
def test_attention_preserves_shape(layer):
    x = torch.randn(2, 32, 6, 6)
    y = layer(32)(x)
    assert y.shape == x.shape and not torch.equal(y, x)


# One small member of each family, built from its class so the tests stay fast.
FAMILIES = {
    "densenet": lambda **kw: DenseNet(growth_rate=8, block_config=(2, 2), num_init_features=16, stem="cifar", **kw),
    "resnet": lambda **kw: ResNet(block="basic", layers=(1, 1), widths=(16, 32), stem="cifar", **kw),
    "dpn": lambda **kw: DPN(k_sec=(1, 1, 1, 1), inc_sec=(8, 8, 8, 8), k_r=32, groups=4, num_init_features=16,
                            stem_kernel=3, bw_factor=1, **kw),
    "resdense": lambda **kw: ResDense(block_config=(1, 1), num_init_features=8, **kw),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn,kind", [("cbam", CBAM), (EfficientChannelAttention, EfficientChannelAttention)])
def test_families_take_attention_by_name_or_class(family: str, attn, kind):
    model = FAMILIES[family](num_classes=3, attn_layer=attn)
    assert any(isinstance(m, kind) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_api_and_one_channel_input(family: str):
    model = FAMILIES[family](num_classes=3, in_chans=1).eval()
    x = torch.randn(2, 1, 32, 32)
    features = model.forward_features(x)
    assert features.shape[:2] == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(features), model(x))
    assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match="densenet121") as info:
        create_model("densenet12")
    # A ValueError like every other refused argument; the CLI and fit() make it their one-line ExciteError.
    assert isinstance(info.value, ValueError) and not isinstance(info.value, ExciteError)


def test_static_names_are_the_registry():
    assert MODEL_NAMES == tuple(list_models())


# Clearly bad values of every constructor argument, by family. Each must be refused with a one-line ValueError
# that names the argument (not a KeyError, TypeError or RuntimeError from deep inside the build).
_COMMON_BAD = {"num_classes": [0, -1, 2.5, "ten"], "in_chans": [0, -3, 1.5], "drop_rate": [-3, 1, 1.5, "x", None],
               "attn_layer": ["sqeeze", 5]}
BAD_VALUES = {
    DenseNet: {**_COMMON_BAD, "growth_rate": [-2, 0, 12.5, "12", True], "block_config": [[0, 2], [], 4, [2, -1], "6"],
               "num_init_features": [0, -8], "bn_size": [-1, 2.5], "compression": [0, 1.5, -0.5, "half", 1e-6],
               "stem": ["vit", 3], "attn_placement": ["everywhere", None], "memory_efficient": ["yes", 2],
               "impl": ["faster", None]},
    ResNet: {**_COMMON_BAD, "block": ["basik", 3, None], "layers": [[0, 2, 2, 2], [], [2, 2, 2, -1], 2],
             "widths": [[64, 0, 256, 512], [64, 128], "wide"], "stem": ["vit"]},
    DPN: {**_COMMON_BAD, "k_sec": [[3, 4, 12], [3, 0, 12, 3], 3], "inc_sec": [[16, 32, 32], [16, -1, 32, 64]],
          "k_r": [0, 64.5], "groups": [0, 7], "num_init_features": [0], "stem_kernel": [0, 4], "bw_factor": [0, -1]},
    ResDense: {**_COMMON_BAD, "block_config": [[0, 2], [], [2, 1.5]], "num_init_features": [0],
               "compression": [0, 1.5, 1e-6], "bottleneck_ratio": [0, 10**6]},
}
# Arguments with a fixed set of values: the message lists them.
CHOICES_LISTED = {"block": "basic, bottleneck", "stem": "imagenet, cifar", "attn_placement": "layer, block, final",
                  "se_placement": "layer, block, final", "impl": "plain, fast",
                  "attn_layer": "none, se, se_linear, eca"}


@pytest.mark.parametrize("family", BAD_VALUES)
def test_bad_values_cover_every_constructor_argument(family):
    assert set(inspect.signature(family).parameters) == set(BAD_VALUES[family])


@pytest.mark.parametrize("name", list_models())
def test_bad_argument_values_are_one_line_value_errors(name: str):
    with torch.device("meta"):  # the family without building weights
        family = type(create_model(name))
    bad = dict(BAD_VALUES[family])
    if "se_placement" in inspect.signature(get_model_builder(name)).parameters:
        bad["se_placement"] = ["everywhere", 1]
    for arg, values in bad.items():
        for value in values:
            with torch.device("meta"), pytest.raises(ValueError) as info:
                create_model(name, **{arg: value})
            message = str(info.value)
            assert arg in message and "\n" not in message, f"{arg}={value!r}: {message}"
            assert CHOICES_LISTED.get(arg, "") in message, f"{arg}={value!r} does not list the choices: {message}"


@pytest.mark.parametrize("placement,where", [
    ("layer", lambda name: ".denselayer" in name),
    ("block", lambda name: name.startswith("features.denseblock") and name.count(".") == 2),
    ("final", lambda name: name == "attn"),
])
def test_se_placement(placement: str, where):
    with torch.device("meta"):
        model = create_model("se_densenet121", se_placement=placement)
    se = [name for name, m in model.named_modules() if isinstance(m, SqueezeExcite)]
    expected = {"layer": 6 + 12 + 24 + 16, "block": 4, "final": 1}[placement]  # densenet121's layers per block
    assert len(se) == expected and all(where(name) for name in se)


def test_resnet_widths_must_match_stages():
    with pytest.raises(ValueError, match="one width per stage"):
        create_model("resnet20_cifar", widths=[4, 8])
