"""DenseNet's building blocks: the dense layer, the dense block and the transition.

Attention enters as a layer (``attn_layer``), at the layer's new features or the block's output, so
SE-DenseNet and ECA-DenseNet are these same blocks with another argument.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from excite.nn.attention import AttnSpec, create_attn


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
            return self.finish(self.relu(self.norm(self.conv(torch.cat(inputs, 1)))))
        if self.memory_efficient and torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            # Recompute the concatenation and bottleneck in backward instead of storing them.
            hidden = cp.checkpoint(self.bottleneck, *inputs, use_reentrant=False)
        else:
            hidden = self.bottleneck(*inputs)
        return self.new_features(hidden)

    def new_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer after its bottleneck: BN-ReLU-Conv3x3, then attention and dropout."""
        return self.finish(self.conv2(self.relu2(self.norm2(hidden))))

    def finish(self, new: torch.Tensor) -> torch.Tensor:
        """Attention, then dropout, on the layer's new features."""
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
