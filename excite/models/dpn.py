"""Dual Path Networks (Chen et al., 2017): a ResNeXt path and a DenseNet path in one block.

Every block adds its bottleneck output to the first ``bw`` channels (the residual path) and appends
``inc`` new channels to the rest (the dense path); both travel as one concatenated tensor.
State-dict names follow timm's ``dpn68`` / ``dpn92`` (``features.conv2_1.c1x1_a.bn``), so its
weights load with :func:`excite.models.load_weights` (which reshapes timm's 1x1-conv classifier to
our Linear head). Attention, when given, acts on each block's bottleneck output before the split,
where SE-ResNeXt puts it.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from excite.models._base import ClassifierModel, init_weights
from excite.models._registry import register_model
from excite.nn.attention import AttnSpec, create_attn, get_attn
from excite.nn.checks import check_float, check_int, check_ints

# The MXNet release that the reference weights come from used BatchNorm eps 1e-3, not PyTorch's 1e-5.
BN_EPS = 1e-3
#: The residual path's width of each of the four stages, before ``bw_factor``.
STAGE_BASES = (64, 128, 256, 512)


class BnActConv(nn.Module):
    """Pre-activation convolution: BN-ReLU-Conv (no bias), named ``bn`` / ``conv`` as in timm."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.act = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.bn(x)))


class DualPathBlock(nn.Module):
    """Grouped bottleneck (1x1 -> grouped 3x3 -> 1x1) whose output feeds both paths.

    ``width`` is the bottleneck's width, ``bw`` the residual path's and ``inc`` what the block adds to
    the dense path. The first block of a stage projects its input to ``bw + 2 * inc`` channels (with
    stride 2 from the second stage on); the projection is ``c1x1_w_s1`` or ``c1x1_w_s2`` after its
    stride, as in timm.
    """

    def __init__(self, in_channels: int, width: int, bw: int, inc: int, groups: int, stride: int = 1,
                 project: bool = False, attn_layer: AttnSpec = None):
        super().__init__()
        self.bw = bw
        self.proj_name = f"c1x1_w_s{stride}" if project else None
        if project:
            self.add_module(self.proj_name, BnActConv(in_channels, bw + 2 * inc, 1, stride=stride))
        self.c1x1_a = BnActConv(in_channels, width, 1)
        self.c3x3_b = BnActConv(width, width, 3, stride=stride, groups=groups)
        self.c1x1_c = BnActConv(width, bw + inc, 1)
        self.attn = create_attn(attn_layer, bw + inc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.proj_name is None else getattr(self, self.proj_name)(x)
        out = self.attn(self.c1x1_c(self.c3x3_b(self.c1x1_a(x))))
        residual = shortcut[:, :self.bw] + out[:, :self.bw]
        return torch.cat([residual, shortcut[:, self.bw:], out[:, self.bw:]], dim=1)


class DPN(ClassifierModel):
    """Dual Path Network.

    Every argument is checked before anything is built: a bad value raises a ValueError naming it.

    Args:
        k_sec: number of blocks in each of the four stages.
        inc_sec: channels each block of a stage adds to the dense path (four numbers).
        k_r: bottleneck width of the first stage (later stages scale it with the stage width).
        groups: groups of the 3x3 convolution (the ResNeXt cardinality); must divide every stage's width.
        num_init_features: channels out of the stem.
        stem_kernel: stem convolution size, odd (7, or 3 for DPN-68).
        bw_factor: residual widths are 64, 128, 256, 512 times this (4, or 1 for DPN-68).
        num_classes: outputs of the classifier, at least 1 (``reset_classifier(0)`` removes it).
        in_chans: channels of the input images.
        drop_rate: dropout before the classifier, as in timm; in [0, 1).
        attn_layer: attention name ("se", "eca", "cbam"...) or layer class, applied in every block.
    """

    head_name = "classifier"

    def __init__(
        self,
        k_sec: tuple[int, ...] = (3, 4, 20, 3),
        inc_sec: tuple[int, ...] = (16, 32, 24, 128),
        k_r: int = 96,
        groups: int = 32,
        num_init_features: int = 64,
        stem_kernel: int = 7,
        bw_factor: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        attn_layer: AttnSpec = None,
    ):
        k_sec = check_ints("k_sec", k_sec, length=len(STAGE_BASES))
        inc_sec = check_ints("inc_sec", inc_sec, length=len(STAGE_BASES))
        check_int("k_r", k_r)
        check_int("groups", groups)
        widths = [k_r * base // 64 for base in STAGE_BASES]
        if any(width % groups for width in widths):
            raise ValueError(f"groups must divide every stage's bottleneck width {widths} (k_r={k_r}), got {groups}")
        check_int("num_init_features", num_init_features)
        if check_int("stem_kernel", stem_kernel) % 2 == 0:
            raise ValueError(f"stem_kernel must be odd (3 or 7), got {stem_kernel}")
        check_int("bw_factor", bw_factor)
        check_int("num_classes", num_classes)
        check_int("in_chans", in_chans)
        check_float("drop_rate", drop_rate, 0, 1)
        get_attn(attn_layer)
        stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(in_chans, num_init_features, stem_kernel, stride=2, padding=stem_kernel // 2,
                               bias=False)),
            ("bn", nn.BatchNorm2d(num_init_features, eps=BN_EPS)),
            ("act", nn.ReLU(inplace=True)),
        ]))
        blocks = [("conv1_1", stem), ("conv1_pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        channels = num_init_features
        for i, (base, depth, inc) in enumerate(zip(STAGE_BASES, k_sec, inc_sec)):
            bw, width = base * bw_factor, k_r * base // 64
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                block = DualPathBlock(channels, width, bw, inc, groups, stride, project=j == 0, attn_layer=attn_layer)
                blocks.append((f"conv{i + 2}_{j + 1}", block))
                # A projection block starts the dense path with 2 * inc channels, then adds inc like the rest.
                channels = bw + 3 * inc if j == 0 else channels + inc
        final = [("bn", nn.BatchNorm2d(channels, eps=BN_EPS)), ("act", nn.ReLU(inplace=True))]
        blocks.append(("conv5_bn_ac", nn.Sequential(OrderedDict(final))))

        super().__init__(num_classes, channels, head_drop=drop_rate)
        self.features = nn.Sequential(OrderedDict(blocks))
        self.classifier = nn.Linear(channels, num_classes)

        init_weights(self, conv_fan="fan_out")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def _dpn(defaults: dict, kwargs: dict) -> DPN:
    return DPN(**{**defaults, **kwargs})


# Chen et al., Table 1 (DPN-68 is the small variant of the reference code: 3x3 stem, narrow residual path).
@register_model
def dpn68(**kwargs) -> DPN:
    return _dpn(dict(k_sec=(3, 4, 12, 3), inc_sec=(16, 32, 32, 64), k_r=128, groups=32, num_init_features=10,
                     stem_kernel=3, bw_factor=1), kwargs)


@register_model
def dpn92(**kwargs) -> DPN:
    return _dpn(dict(k_sec=(3, 4, 20, 3), inc_sec=(16, 32, 24, 128), k_r=96, groups=32, num_init_features=64,
                     stem_kernel=7, bw_factor=4), kwargs)
