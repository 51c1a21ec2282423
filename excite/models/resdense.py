"""ResDense: a DenseNet whose dense layer is a ResNet-style three-convolution bottleneck.

Each layer maps its C input channels through BN-ReLU-Conv1x1(C/4)-BN-ReLU-Conv3x3(C/4)-BN-ReLU-Conv1x1(C)
and concatenates the result with its input, so every layer doubles the channels (instead of adding a
fixed growth rate). Stem, transitions and names follow torchvision's DenseNet
(``features.denseblock1.denselayer1.conv1``).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from excite.models._base import ClassifierModel, init_weights
from excite.models._registry import register_model
from excite.models.densenet import imagenet_stem
from excite.nn.attention import AttnSpec, create_attn, get_attn
from excite.nn.checks import check_float, check_int, check_ints
from excite.nn.dense import Transition


class ResDenseLayer(nn.Module):
    """Bottleneck of width C/4 that produces C new channels, concatenated to its C input channels."""

    def __init__(self, channels: int, bottleneck_ratio: int = 4, drop_rate: float = 0.0, attn_layer: AttnSpec = None):
        super().__init__()
        width = channels // bottleneck_ratio
        self.norm1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(channels, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, channels, kernel_size=1, bias=False)
        self.attn = create_attn(attn_layer, channels)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.conv1(self.relu1(self.norm1(x)))
        new = self.conv2(self.relu2(self.norm2(new)))
        new = self.attn(self.conv3(self.relu3(self.norm3(new))))
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return torch.cat([x, new], 1)


class ResDense(ClassifierModel):
    """DenseNet with :class:`ResDenseLayer` layers; ``num_layers`` layers multiply a block's width by 2**num_layers.

    Every argument is checked before anything is built: a bad value raises a ValueError naming it.

    Args:
        block_config: number of layers in each dense block.
        num_init_features: channels out of the 7x7/2 + max-pool stem.
        compression: fraction of channels a transition keeps, in (0, 1].
        bottleneck_ratio: each layer's bottleneck is its input width divided by this (at least one channel).
        drop_rate: dropout on each layer's new features, in [0, 1).
        num_classes: outputs of the classifier, at least 1 (``reset_classifier(0)`` removes it).
        in_chans: channels of the input images.
        attn_layer: attention name ("se", "eca", "cbam"...) or layer class, on each layer's new features.
    """

    head_name = "classifier"

    def __init__(
        self,
        block_config: tuple[int, ...] = (2, 4, 3, 2),
        num_init_features: int = 64,
        compression: float = 0.5,
        bottleneck_ratio: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
        in_chans: int = 3,
        attn_layer: AttnSpec = None,
    ):
        block_config = check_ints("block_config", block_config)
        check_int("num_init_features", num_init_features)
        check_float("compression", compression, 0, 1, closed="(]")
        check_int("bottleneck_ratio", bottleneck_ratio)
        _check_bottlenecks(num_init_features, block_config, compression, bottleneck_ratio)
        check_float("drop_rate", drop_rate, 0, 1)
        check_int("num_classes", num_classes)
        check_int("in_chans", in_chans)
        get_attn(attn_layer)
        layers = imagenet_stem(in_chans, num_init_features)
        channels = num_init_features
        for i, num_layers in enumerate(block_config):
            block = nn.Sequential(OrderedDict(
                (f"denselayer{j + 1}", ResDenseLayer(channels * 2 ** j, bottleneck_ratio, drop_rate, attn_layer))
                for j in range(num_layers)
            ))
            layers.append((f"denseblock{i + 1}", block))
            channels *= 2 ** num_layers
            if i != len(block_config) - 1:
                out = int(math.floor(channels * compression))
                layers.append((f"transition{i + 1}", Transition(channels, out)))
                channels = out
        layers += [("norm5", nn.BatchNorm2d(channels)), ("relu5", nn.ReLU(inplace=True))]

        super().__init__(num_classes, channels)
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Linear(channels, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _check_bottlenecks(channels: int, block_config: tuple[int, ...], compression: float, ratio: int) -> None:
    """A ValueError if a block's first layer would have a bottleneck of no channels (``channels // ratio == 0``)."""
    for i, num_layers in enumerate(block_config):
        if channels < ratio:
            raise ValueError(f"bottleneck_ratio {ratio} and compression {compression} leave denseblock{i + 1} "
                             f"{channels} input channels, too few for a bottleneck of channels // bottleneck_ratio")
        channels = math.floor(channels * 2 ** num_layers * compression)


@register_model
def resdense_j4(**kwargs) -> ResDense:
    """The tutorial's hybrid: four blocks of 2, 4, 3 and 2 doubling layers (150M parameters)."""
    return ResDense(**{"block_config": (2, 4, 3, 2), **kwargs})
