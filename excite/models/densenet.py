"""DenseNet (Huang et al., 2017), with attention passed in as a layer.

State-dict names follow torchvision (``features.denseblock1.denselayer1.conv1.weight``), so its
released weights load unchanged. Attention enters through ``attn_layer`` at one of three places
(``attn_placement``): on each dense layer's new features ("layer"), on each dense block's output
("block") or once on the final features ("final").
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from excite.models._base import ClassifierModel, init_weights
from excite.models._registry import register_model
from excite.nn.attention import AttnSpec, create_attn

PLACEMENTS = ("layer", "block", "final")


class DenseLayer(nn.Module):
    """One dense layer: produces ``growth_rate`` new channels from the concatenation of all before it.

    With ``bn_size > 0`` it is the DenseNet-B layer BN-ReLU-Conv1x1(bn_size*k)-BN-ReLU-Conv3x3(k);
    with ``bn_size == 0`` the plain Conv3x3-BN-ReLU layer of the seed tutorials.
    """

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        attn_layer: AttnSpec = None,
        memory_efficient: bool = False,
    ):
        super().__init__()
        if bn_size > 0:
            width = bn_size * growth_rate
            self.norm1 = nn.BatchNorm2d(in_channels)
            self.relu1 = nn.ReLU(inplace=True)
            self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
            self.norm2 = nn.BatchNorm2d(width)
            self.relu2 = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(width, growth_rate, kernel_size=3, padding=1, bias=False)
        else:
            self.conv = nn.Conv2d(in_channels, growth_rate, kernel_size=3, padding=1)
            self.norm = nn.BatchNorm2d(growth_rate)
            self.relu = nn.ReLU(inplace=True)
        self.attn = create_attn(attn_layer, growth_rate)
        self.bn_size = bn_size
        self.drop_rate = drop_rate
        self.memory_efficient = memory_efficient

    def bottleneck(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        if self.bn_size == 0:
            new = self.relu(self.norm(self.conv(torch.cat(inputs, 1))))
        else:
            if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
                # Recompute the concatenation and bottleneck in backward instead of storing them.
                hidden = cp.checkpoint(self.bottleneck, *inputs, use_reentrant=False)
            else:
                hidden = self.bottleneck(*inputs)
            new = self.conv2(self.relu2(self.norm2(hidden)))
        new = self.attn(new)
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each seeing every earlier output; returns their concatenation."""

    def __init__(self, num_layers: int, in_channels: int, growth_rate: int, attn_layer: AttnSpec = None,
                 attn_placement: str = "layer", **layer_kwargs):
        super().__init__()
        layer_attn = attn_layer if attn_placement == "layer" else None
        for i in range(num_layers):
            layer = DenseLayer(in_channels + i * growth_rate, growth_rate, attn_layer=layer_attn, **layer_kwargs)
            self.add_module(f"denselayer{i + 1}", layer)
        self.out_channels = in_channels + num_layers * growth_rate
        self.attn = create_attn(attn_layer if attn_placement == "block" else None, self.out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for name, layer in self.named_children():
            if name.startswith("denselayer"):
                features.append(layer(features))
        return self.attn(torch.cat(features, 1))


class Transition(nn.Sequential):
    """BN-ReLU-Conv1x1 to compress the channels, then 2x2 average pooling to halve the resolution."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(OrderedDict([
            ("norm", nn.BatchNorm2d(in_channels)),
            ("relu", nn.ReLU(inplace=True)),
            ("conv", nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)),
            ("pool", nn.AvgPool2d(kernel_size=2, stride=2)),
        ]))


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

    Args:
        growth_rate: channels each dense layer adds (k).
        block_config: number of layers in each dense block.
        num_init_features: channels out of the stem.
        bn_size: bottleneck width as a multiple of k; 0 for the plain layer without bottleneck.
        compression: fraction of channels a transition keeps (theta; 0.5 in DenseNet-BC).
        drop_rate: dropout on each layer's new features, as in the paper and torchvision.
        attn_layer: attention name ("se", "eca", "cbam"...) or layer class; None for plain DenseNet.
        attn_placement: "layer", "block" or "final" (see the module docstring).
        memory_efficient: recompute each bottleneck in backward to save memory (slower).
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
    ):
        if attn_placement not in PLACEMENTS:
            raise ValueError(f"attn_placement must be one of {', '.join(PLACEMENTS)}, got {attn_placement!r}")
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        if stem == "imagenet":
            layers = imagenet_stem(in_chans, num_init_features)
        elif stem == "cifar":
            # DenseNet-BC on CIFAR: one 3x3 convolution, no pooling, BN-ReLU comes in the first layer.
            layers = [("conv0", nn.Conv2d(in_chans, num_init_features, kernel_size=3, padding=1, bias=False))]
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")

        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers, channels, growth_rate, attn_layer=attn_layer,
                               attn_placement=attn_placement, bn_size=bn_size, drop_rate=drop_rate,
                               memory_efficient=memory_efficient)
            layers.append((f"denseblock{i + 1}", block))
            channels = block.out_channels
            if i != len(block_config) - 1:
                out = int(math.floor(channels * compression))
                layers.append((f"transition{i + 1}", Transition(channels, out)))
                channels = out
        layers += [("norm5", nn.BatchNorm2d(channels)), ("relu5", nn.ReLU(inplace=True))]
        if attn_placement == "final" and attn_layer is not None:
            layers.append(("attn", create_attn(attn_layer, channels)))

        super().__init__(num_classes, channels)
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()
        self.growth_rate = growth_rate
        self.drop_rate = drop_rate
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


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
@register_model
def se_densenet121(se_placement: str = "layer", **kwargs) -> DenseNet:
    return densenet121(**{"attn_layer": "se", "attn_placement": se_placement, **kwargs})


@register_model
def se_densenet169(se_placement: str = "layer", **kwargs) -> DenseNet:
    return densenet169(**{"attn_layer": "se", "attn_placement": se_placement, **kwargs})


@register_model
def se_densenet201(se_placement: str = "layer", **kwargs) -> DenseNet:
    return densenet201(**{"attn_layer": "se", "attn_placement": se_placement, **kwargs})


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
    return densenet_bc_100(**{"attn_layer": "se", "attn_placement": se_placement, **kwargs})
