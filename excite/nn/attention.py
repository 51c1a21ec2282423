"""Channel and spatial attention layers, and the one way to name them.

Every attention layer is built as ``layer(channels)`` and returns a tensor shaped like its input, so a
block only needs an ``attn_layer`` argument to take any of them (SE-ResNet is ResNet with
``attn_layer="se"``). Each computes its per-channel scores in a submodule named ``gate`` (a sigmoid), so
``excite.explain`` can read or replace a channel gate by hooking that one module, whatever the layer.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Union

import torch
from torch import nn

from excite.nn.checks import check_choice, check_int


def reduced_channels(channels: int, reduction: int, min_channels: int) -> int:
    """Width of an attention bottleneck: ``channels // reduction``, but never below ``min_channels``."""
    return max(channels // reduction, min_channels)


class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al., 2018): global average pool, bottleneck MLP, sigmoid gate.

    ``form="conv"`` builds the MLP from 1x1 convolutions (the layout of timm and the SENet release);
    ``form="linear"`` from ``nn.Linear`` (the paper's figure and most tutorials). Given the same
    weights both compute the same function. The reduced width is ``channels // reduction``, floored at
    ``min_channels`` so narrow layers (a DenseNet layer adds only 12-48 channels) keep a useful gate.
    """

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8, form: str = "conv"):
        super().__init__()
        check_choice("form", form, ("conv", "linear"))
        check_int("reduction", reduction)
        check_int("min_channels", min_channels)
        hidden = reduced_channels(channels, reduction, min_channels)
        self.form = form
        if form == "conv":
            self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
            self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        else:
            self.fc1 = nn.Linear(channels, hidden)
            self.fc2 = nn.Linear(hidden, channels)
        self.act = nn.ReLU(inplace=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=self.form == "conv")
        s = self.gate(self.fc2(self.act(self.fc1(s))))
        if self.form == "linear":
            s = s[:, :, None, None]
        return x * s


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al., 2020): a 1-D convolution across pooled channels instead of an MLP.

    The kernel size grows with log2(channels) as in the paper (gamma=2, b=1), always odd.
    """

    def __init__(self, channels: int, gamma: int = 2, beta: int = 1, kernel_size: int | None = None):
        super().__init__()
        if kernel_size is None:
            k = int(abs((math.log2(channels) + beta) / gamma))
            kernel_size = k if k % 2 else k + 1
        if check_int("kernel_size", kernel_size) % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the output keeps the channel count), got {kernel_size}")
        self.conv = nn.Conv1d(1, 1, kernel_size, padding=(kernel_size - 1) // 2, bias=False)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3))[:, None, :]  # (N, 1, C): channels become the sequence the 1-D conv slides over
        s = self.gate(self.conv(s))
        return x * s[:, 0, :, None, None]


class CBAM(nn.Module):
    """CBAM (Woo et al., 2018): channel attention from average- and max-pooled MLP, then spatial
    attention from a 7x7 convolution over the channel-wise mean and max."""

    def __init__(self, channels: int, reduction: int = 16, min_channels: int = 8, spatial_kernel: int = 7):
        super().__init__()
        check_int("reduction", reduction)
        check_int("min_channels", min_channels)
        if check_int("spatial_kernel", spatial_kernel) % 2 == 0:
            raise ValueError(f"spatial_kernel must be odd (the output keeps the image size), got {spatial_kernel}")
        hidden = reduced_channels(channels, reduction, min_channels)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, bias=False)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.gate = nn.Sigmoid()  # the channel gate; the spatial map has its own, so the two stay apart
        self.spatial_gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = lambda s: self.fc2(self.act(self.fc1(s)))  # noqa: E731 - shared by both pooled inputs
        x = x * self.gate(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * self.spatial_gate(self.spatial(pooled))


AttnSpec = Union[str, Callable[[int], nn.Module], None]

ATTENTION_LAYERS: dict[str, Callable[[int], nn.Module]] = {
    "se": SqueezeExcite,
    "se_linear": functools.partial(SqueezeExcite, form="linear"),
    "eca": EfficientChannelAttention,
    "cbam": CBAM,
}


def get_attn(spec: AttnSpec) -> Callable[[int], nn.Module] | None:
    """Resolve an attention spec to a layer factory ``factory(channels) -> nn.Module``.

    ``spec`` is a name from :data:`ATTENTION_LAYERS`, ``None``/``"none"`` for no attention, or any
    callable taking the channel count (a class, or a ``functools.partial`` of one). Anything else raises
    a ValueError listing the names.
    """
    if spec is None or spec in ("", "none"):
        return None
    if isinstance(spec, str):
        if spec not in ATTENTION_LAYERS:
            raise ValueError(f"attn_layer must be one of none, {', '.join(ATTENTION_LAYERS)} (or a layer class), "
                             f"got {spec!r}")
        return ATTENTION_LAYERS[spec]
    if callable(spec):
        return spec
    raise ValueError(f"attn_layer must be one of none, {', '.join(ATTENTION_LAYERS)} or a layer class, got {spec!r}")


def create_attn(spec: AttnSpec, channels: int) -> nn.Module:
    """Build the attention layer for ``channels`` channels, or ``nn.Identity()`` when there is none."""
    factory = get_attn(spec)
    return factory(channels) if factory is not None else nn.Identity()
