"""DenseNet (Huang et al., 2017), with attention passed in as a layer.

State-dict names follow torchvision (``features.denseblock1.denselayer1.conv1.weight``), so its
released weights load unchanged. Attention enters through ``attn_layer`` at one of three places
(``attn_placement``): on each dense layer's new features ("layer"), on each dense block's output
("block") or once on the final features ("final", the module ``attn`` after ``features``).

``features`` ends in the final BatchNorm ``norm5`` and the ReLU after it is applied in ``forward_features``, as
in torchvision, so ``features[-1]``, ``features.norm5`` and ``features(x)`` mean what they mean there (a hook on
``norm5`` sees the BatchNorm's output, before the ReLU).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from excite.models._base import ClassifierModel, init_weights
from excite.models._registry import register_model
from excite.nn.attention import AttnSpec, create_attn, get_attn
from excite.nn.checks import check_bool, check_choice, check_float, check_int, check_ints
from excite.nn.dense import DenseBlock, Transition
from excite.nn.dense_fast import FastDenseBlock

PLACEMENTS = ("layer", "block", "final")
BLOCKS = {"plain": DenseBlock, "fast": FastDenseBlock}
STEMS = ("imagenet", "cifar")


def imagenet_stem(in_chans: int, channels: int) -> list[tuple[str, nn.Module]]:
    """The ImageNet stem as named layers: 7x7/2 convolution, BN, ReLU, 3x3/2 max pool (4x downsampling)."""
    return [
        ("conv0", nn.Conv2d(in_chans, channels, kernel_size=7, stride=2, padding=3, bias=False)),
        ("norm0", nn.BatchNorm2d(channels)),
        ("relu0", nn.ReLU(inplace=True)),
        ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
    ]


class DenseNet(ClassifierModel):
    """DenseNet / DenseNet-BC for ImageNet-size (``stem="imagenet"``) or 32x32 inputs (``stem="cifar"``).

    Every argument is checked before anything is built: a bad value raises a ValueError naming it.

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: number of layers in each dense block.
        num_init_features: channels out of the stem.
        bn_size: bottleneck width as a multiple of k; 0 for the plain layer without bottleneck.
        compression: fraction of channels a transition keeps (theta; 0.5 in DenseNet-BC).
        drop_rate: dropout on each layer's new features, as in the paper and torchvision; in [0, 1).
        num_classes: outputs of the classifier, at least 1 (``reset_classifier(0)`` removes it).
        in_chans: channels of the input images.
        stem: "imagenet" (7x7/2 convolution and max pool) or "cifar" (one 3x3 convolution).
        attn_layer: attention name ("se", "eca", "cbam"...) or layer class; None for plain DenseNet.
        attn_placement: "layer", "block" or "final" (see the module docstring).
        memory_efficient: recompute each bottleneck in backward to save memory (slower).
        impl: "plain" concatenates features before every layer, as torchvision does; "fast" writes them
            into one pre-allocated buffer per block and recomputes BN-ReLU in backward (same function
            and weights, about 40% of the training memory; see :mod:`excite.nn.dense_fast`).
    """

    head_name = "classifier"

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        stem: str = "imagenet",
        attn_layer: AttnSpec = None,
        attn_placement: str = "layer",
        memory_efficient: bool = False,
        impl: str = "plain",
    ):
        check_int("growth_rate", growth_rate)
        block_config = check_ints("block_config", block_config)
        check_int("num_init_features", num_init_features)
        check_int("bn_size", bn_size, minimum=0)
        check_float("compression", compression, 0, 1, closed="(]")
        check_float("drop_rate", drop_rate, 0, 1)
        check_int("num_classes", num_classes)
        check_int("in_chans", in_chans)
        check_choice("stem", stem, STEMS)
        get_attn(attn_layer)
        check_choice("attn_placement", attn_placement, PLACEMENTS)
        check_bool("memory_efficient", memory_efficient)
        check_choice("impl", impl, BLOCKS)
        _check_transitions(num_init_features, growth_rate, block_config, compression)

        if stem == "imagenet":
            layers = imagenet_stem(in_chans, num_init_features)
        else:
            # DenseNet-BC on CIFAR: one 3x3 convolution, no pooling, BN-ReLU comes in the first layer.
            layers = [("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]

        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = BLOCKS[impl](num_layers, channels, growth_rate, attn_layer=attn_layer,
                               attn_placement=attn_placement, bn_size=bn_size, drop_rate=drop_rate,
                               memory_efficient=memory_efficient)
            layers.append((f"denseblock{i + 1}", block))
            channels = block.out_channels
            if i != len(block_config) - 1:
                out = math.floor(channels * compression)
                layers.append((f"transition{i + 1}", Transition(channels, out)))
                channels = out
        # features ends in norm5, as torchvision's does, and forward_features applies the ReLU after it, so
        # features[-1], features.norm5 and features(x) are the modules and tensor torchvision's names give.
        layers.append(("norm5", nn.BatchNorm2d(channels)))

        super().__init__(num_classes, channels)
        self.features = nn.Sequential(OrderedDict(layers))
        # Registered before the classifier: the parameters keep the order they had inside features, which an
        # optimizer's saved state relies on when an older run resumes.
        self.attn = create_attn(attn_layer, channels) if attn_placement == "final" and get_attn(attn_layer) else None
        self.classifier = nn.Linear(channels, num_classes)
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place (torchvision's is): a hook on norm5 keeps the BatchNorm's output, not the ReLU's.
        x = F.relu(self.features(x))
        return x if self.attn is None else self.attn(x)

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """The children of ``features``, then the attention on the final features when there is one."""
        return super().stage_modules() + ([] if self.attn is None else [("attn", self.attn)])


def _check_transitions(channels: int, growth_rate: int, block_config: tuple[int, ...], compression: float) -> None:
    """A ValueError if a transition would keep no channels (a tiny ``compression`` of narrow blocks)."""
    for i, num_layers in enumerate(block_config[:-1]):
        channels = math.floor((channels + num_layers * growth_rate) * compression)
        if channels < 1:
            raise ValueError(f"compression {compression} leaves no channels after denseblock{i + 1}: use a larger "
                             "compression, growth_rate or num_init_features")


def _densenet(defaults: dict, kwargs: dict) -> DenseNet:
    return DenseNet(**{**defaults, **kwargs})


# ImageNet DenseNet-BC (Huang et al., Table 1; densenet264 as in the paper's 264-layer row).
@register_model
def densenet121(**kwargs) -> DenseNet:
    return _densenet(dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64), kwargs)


@register_model
def densenet169(**kwargs) -> DenseNet:
    return _densenet(dict(growth_rate=32, block_config=(6, 12, 32, 32), num_init_features=64), kwargs)


@register_model
def densenet201(**kwargs) -> DenseNet:
    return _densenet(dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64), kwargs)


@register_model
def densenet161(**kwargs) -> DenseNet:
    return _densenet(dict(growth_rate=48, block_config=(6, 12, 36, 24), num_init_features=96), kwargs)


@register_model
def densenet264(**kwargs) -> DenseNet:
    return _densenet(dict(growth_rate=32, block_config=(6, 12, 64, 48), num_init_features=64), kwargs)


# SE-DenseNet: DenseNet with SE attention, by default on every dense layer's new features.
def _se_densenet(builder, se_placement: str, kwargs: dict) -> DenseNet:
    check_choice("se_placement", se_placement, PLACEMENTS)
    return builder(**{"attn_layer": "se", "attn_placement": se_placement, **kwargs})


@register_model
def se_densenet121(se_placement: str = "layer", **kwargs) -> DenseNet:
    return _se_densenet(densenet121, se_placement, kwargs)


@register_model
def se_densenet169(se_placement: str = "layer", **kwargs) -> DenseNet:
    return _se_densenet(densenet169, se_placement, kwargs)


@register_model
def se_densenet201(se_placement: str = "layer", **kwargs) -> DenseNet:
    return _se_densenet(densenet201, se_placement, kwargs)


# CIFAR DenseNet-BC (Huang et al., Table 2): depth L = 6n + 4, three blocks of n layers, 2k stem channels.
def _densenet_bc_cifar(depth: int, growth_rate: int, kwargs: dict) -> DenseNet:
    n = (depth - 4) // 6
    defaults = dict(growth_rate=growth_rate, block_config=(n, n, n), num_init_features=2 * growth_rate,
                    stem="cifar", num_classes=10)
    return _densenet(defaults, kwargs)


@register_model
def densenet_bc_100(**kwargs) -> DenseNet:
    return _densenet_bc_cifar(100, 12, kwargs)


@register_model
def densenet_bc_250(**kwargs) -> DenseNet:
    return _densenet_bc_cifar(250, 24, kwargs)


@register_model
def densenet_bc_190(**kwargs) -> DenseNet:
    return _densenet_bc_cifar(190, 40, kwargs)


@register_model
def se_densenet_bc_100(se_placement: str = "layer", **kwargs) -> DenseNet:
    return _se_densenet(densenet_bc_100, se_placement, kwargs)
