"""ResNet (He et al., 2016) and SE-ResNet (Hu et al., 2018) as one family.

SE-ResNet is ResNet with ``attn_layer="se"``: each block applies its attention after its last
BatchNorm and before the residual add. State-dict names follow torchvision (``layer1.0.bn1``,
``layer1.0.downsample.0``); the attention layer of a block is ``layer1.0.attn``.
"""
from __future__ import annotations

from typing import Type, Union

import torch
from torch import nn

from excite.models._base import ClassifierModel, init_weights
from excite.models._registry import register_model
from excite.nn.attention import AttnSpec, create_attn, get_attn
from excite.nn.checks import check_choice, check_float, check_int, check_ints


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (ResNet-18/34 and the CIFAR ResNets)."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, attn_layer: AttnSpec = None):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.attn = create_attn(attn_layer, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.attn(self.bn2(self.conv2(out)))
        # In place, as torchvision does: backward needs neither operand of the addition, and nothing else keeps
        # ``out`` for it (BatchNorm and the attention layers save their inputs), so a block allocates one
        # tensor fewer: about 4% of a ResNet-50 training step on a 2-core CPU.
        out += shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's "ResNet v1.5"), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, attn_layer: AttnSpec = None):
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.attn = create_attn(attn_layer, out_channels)
        self.downsample = _shortcut(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.attn(self.bn3(self.conv3(out)))
        out += shortcut
        return self.relu(out)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Projection (1x1 conv + BN) where the shape changes, identity otherwise."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


Block = Type[Union[BasicBlock, Bottleneck]]
BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "cifar")


class ResNet(ClassifierModel):
    """ResNet for ImageNet-size (``stem="imagenet"``: 7x7/2 conv + max pool) or 32x32 inputs
    (``stem="cifar"``: one 3x3 conv).

    Every argument is checked before anything is built: a bad value raises a ValueError naming it.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``, or their names "basic" and "bottleneck".
        layers: number of blocks in each stage.
        widths: planes of each stage (one per stage); stages after the first halve the resolution.
        num_classes: outputs of the classifier, at least 1 (``reset_classifier(0)`` removes it).
        in_chans: channels of the input images.
        drop_rate: dropout before the classifier, in [0, 1).
        stem: "imagenet" (7x7/2 convolution and max pool) or "cifar" (one 3x3 convolution).
        attn_layer: attention name ("se", "eca", "cbam"...) or layer class, applied in every block; the
            shortcut is added to its output in place.
    """

    def __init__(
        self,
        block: Block = Bottleneck,
        layers: tuple[int, ...] = (3, 4, 6, 3),
        widths: tuple[int, ...] = (64, 128, 256, 512),
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        stem: str = "imagenet",
        attn_layer: AttnSpec = None,
    ):
        if not isinstance(block, type):  # a name; a class is used as it is
            block = BLOCKS[check_choice("block", block, BLOCKS)]
        layers = check_ints("layers", layers)
        widths = check_ints("widths", widths)
        if len(widths) != len(layers):
            raise ValueError(f"widths {widths} must give one width per stage of layers {layers}")
        check_int("num_classes", num_classes)
        check_int("in_chans", in_chans)
        check_float("drop_rate", drop_rate, 0, 1)
        check_choice("stem", stem, STEMS)
        get_attn(attn_layer)
        num_features = widths[-1] * block.expansion
        super().__init__(num_classes, num_features, head_drop=drop_rate)
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_chans, widths[0], kernel_size=3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        channels = widths[0]
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(block(channels, planes, stride, attn_layer=attn_layer))
                channels = planes * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(layers)
        self.fc = nn.Linear(num_features, num_classes)

        init_weights(self, conv_fan="fan_out")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x


def _resnet(defaults: dict, kwargs: dict) -> ResNet:
    return ResNet(**{**defaults, **kwargs})


def _se(kwargs: dict) -> dict:
    return {"attn_layer": "se", **kwargs}


# ImageNet ResNets (He et al., Table 1).
@register_model
def resnet18(**kwargs) -> ResNet:
    return _resnet(dict(block=BasicBlock, layers=(2, 2, 2, 2)), kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    return _resnet(dict(block=BasicBlock, layers=(3, 4, 6, 3)), kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    return _resnet(dict(block=Bottleneck, layers=(3, 4, 6, 3)), kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    return _resnet(dict(block=Bottleneck, layers=(3, 4, 23, 3)), kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    return _resnet(dict(block=Bottleneck, layers=(3, 8, 36, 3)), kwargs)


@register_model
def se_resnet18(**kwargs) -> ResNet:
    return resnet18(**_se(kwargs))


@register_model
def se_resnet34(**kwargs) -> ResNet:
    return resnet34(**_se(kwargs))


@register_model
def se_resnet50(**kwargs) -> ResNet:
    return resnet50(**_se(kwargs))


@register_model
def se_resnet101(**kwargs) -> ResNet:
    return resnet101(**_se(kwargs))


@register_model
def se_resnet152(**kwargs) -> ResNet:
    return resnet152(**_se(kwargs))


# CIFAR ResNets (He et al., Sec. 4.2; the SENet paper's Table 4): three stages of 16/32/64 planes,
# depth 6n+2 with basic blocks, 9n+2 with bottlenecks (ResNet-164). Shortcuts are 1x1 projections.
def _resnet_cifar(block: Block, n: int, kwargs: dict) -> ResNet:
    return _resnet(dict(block=block, layers=(n, n, n), widths=(16, 32, 64), stem="cifar", num_classes=10), kwargs)


@register_model
def resnet18_cifar(**kwargs) -> ResNet:
    """ResNet-18's four stages (64-512 planes) behind the 3x3 CIFAR stem: the common strong CIFAR baseline."""
    return _resnet(dict(block=BasicBlock, layers=(2, 2, 2, 2), stem="cifar", num_classes=10), kwargs)


@register_model
def resnet20_cifar(**kwargs) -> ResNet:
    return _resnet_cifar(BasicBlock, 3, kwargs)


@register_model
def resnet56_cifar(**kwargs) -> ResNet:
    return _resnet_cifar(BasicBlock, 9, kwargs)


@register_model
def resnet110_cifar(**kwargs) -> ResNet:
    return _resnet_cifar(BasicBlock, 18, kwargs)


@register_model
def resnet164_cifar(**kwargs) -> ResNet:
    return _resnet_cifar(Bottleneck, 18, kwargs)


@register_model
def se_resnet18_cifar(**kwargs) -> ResNet:
    return resnet18_cifar(**_se(kwargs))


@register_model
def se_resnet20_cifar(**kwargs) -> ResNet:
    return resnet20_cifar(**_se(kwargs))


@register_model
def se_resnet56_cifar(**kwargs) -> ResNet:
    return resnet56_cifar(**_se(kwargs))


@register_model
def se_resnet110_cifar(**kwargs) -> ResNet:
    return resnet110_cifar(**_se(kwargs))


@register_model
def se_resnet164_cifar(**kwargs) -> ResNet:
    return resnet164_cifar(**_se(kwargs))
