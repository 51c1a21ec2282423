"""What the channel gates learned: the SENet paper's "role of excitation" analysis for any excite model.

Hu et al. (Squeeze-and-Excitation Networks, section 7) show the mean gate value of each channel per class at
several depths: nearly the same for every class in early stages, increasingly class-specific in later ones,
and almost saturated in the last. :func:`excitation_stats` gathers those numbers for a model and a data set;
:func:`replaced_gate_accuracy` asks whether the network needs class-specific gating in a stage at all, by
running it with that stage's gates fixed at their data-set mean.

Every excite attention layer (SE, ECA, CBAM) computes its channel scores in a submodule named ``gate``, so
one forward hook there reads them, and a hook that returns a constant replaces them. A stage is a run of
attention layers working at one feature-map size: the model's own stages, for every family.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from excite.nn.attention import CBAM, EfficientChannelAttention, SqueezeExcite

#: The attention layers whose ``gate`` submodule is a per-channel gate.
GATED_LAYERS = (SqueezeExcite, EfficientChannelAttention, CBAM)


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention layers of ``model`` with a channel gate, in forward (registration) order, by name."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, GATED_LAYERS)]


@dataclass
class LayerExcitation:
    """The gate values of one attention layer over a data set, summarised per class.

    ``class_mean`` and ``class_std`` are (classes, channels) arrays; ``count`` the images per class.
    """

    name: str
    kind: str                 # "SqueezeExcite", "EfficientChannelAttention" or "CBAM"
    stage: int                # 0-based index of the feature-map size the layer works at, shallow to deep
    resolution: tuple[int, int]
    class_mean: np.ndarray
    class_std: np.ndarray
    count: np.ndarray

    @property
    def channels(self) -> int:
        return self.class_mean.shape[1]

    @property
    def mean(self) -> np.ndarray:
        """Each channel's mean gate over every image (weighted by how many images each class has)."""
        return (self.class_mean * self.count[:, None]).sum(0) / max(self.count.sum(), 1)

    @property
    def specificity(self) -> float:
        """How class-specific the gates are: per channel, the spread of the class means (their standard
        deviation across classes) over the spread inside a class (the mean within-class standard deviation),
        averaged over channels. Near 0: every class gets the same gate (as in the paper's early stages)."""
        present = self.count > 0
        between = self.class_mean[present].std(0)
        within = self.class_std[present].mean(0)
        return float(np.mean(between / np.maximum(within, 1e-6)))

    @property
    def saturation(self) -> float:
        """The share of channels whose mean gate is above 0.9 or below 0.1 (the paper's last stage: near 1)."""
        mean = self.mean
        return float(np.mean((mean > 0.9) | (mean < 0.1)))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "resolution": list(self.resolution),
                "channels": self.channels, "specificity": self.specificity, "saturation": self.saturation,
                "mean": self.mean.tolist(), "class_mean": self.class_mean.tolist(),
                "class_std": self.class_std.tolist(), "count": self.count.tolist()}


@dataclass
class ExcitationStats:
    """Gate statistics of every attention layer of a model, in depth order."""

    layers: list[LayerExcitation]
    classes: list[str]
    accuracy: float           # of the model as it is, on the images the statistics came from
    images: int

    def stages(self) -> dict[int, list[LayerExcitation]]:
        found: dict[int, list[LayerExcitation]] = {}
        for layer in self.layers:
            found.setdefault(layer.stage, []).append(layer)
        return found

    def to_dict(self) -> dict:
        return {"classes": self.classes, "images": self.images, "accuracy": self.accuracy,
                "layers": [layer.to_dict() for layer in self.layers]}


class NoAttention(ValueError):
    """The model has no attention layer with a channel gate."""


def _require_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers = attention_layers(model)
    if not layers:
        raise NoAttention(f"{type(model).__name__} has no attention layers (SE, ECA or CBAM) to analyse: train a "
                          "model with attention, e.g. --model se_resnet20_cifar or --model-arg attn_layer=se")
    return layers


def _batches(loader: Iterable, device: torch.device):
    for images, labels in loader:
        yield images.to(device), labels.to(device)


@torch.no_grad()
def excitation_stats(model: nn.Module, loader: Iterable, classes: list[str], *,
                     device: str | torch.device = "cpu") -> ExcitationStats:
    """Per class and channel, the mean and standard deviation of every attention layer's gate over ``loader``.

    ``loader`` yields (images, labels) batches, prepared as the model expects them (the run's eval
    transform). Statistics are accumulated batch by batch (sums and sums of squares in float64), so memory
    does not grow with the data set. Raises :class:`NoAttention` (a ValueError) when the model has none.
    """
    device = torch.device(device)
    layers = _require_attention(model)
    num_classes = len(classes)
    sums: dict[str, torch.Tensor] = {}
    squares: dict[str, torch.Tensor] = {}
    resolution: dict[str, tuple[int, int]] = {}
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    current: dict[str, torch.Tensor] = {}  # the labels of the batch in flight

    def record(name: str):
        def pre_hook(_module, args):
            resolution.setdefault(name, tuple(args[0].shape[-2:]))

        def gate_hook(_module, _args, gate: torch.Tensor):
            values = gate.detach().reshape(gate.shape[0], -1).double()  # (N, C) for every layer's layout
            onehot = nn.functional.one_hot(current["labels"], num_classes).double()  # (N, K)
            if name not in sums:
                sums[name] = torch.zeros(num_classes, values.shape[1], dtype=torch.float64, device=device)
                squares[name] = torch.zeros_like(sums[name])
            sums[name] += onehot.T @ values
            squares[name] += onehot.T @ values.square()
        return pre_hook, gate_hook

    handles = []
    for name, module in layers:
        pre_hook, gate_hook = record(name)
        handles += [module.register_forward_pre_hook(pre_hook), module.gate.register_forward_hook(gate_hook)]
    model.eval().to(device)
    correct = images = 0
    try:
        for x, y in _batches(loader, device):
            current["labels"] = y
            correct += (model(x).argmax(1) == y).sum().item()
            images += len(y)
            counts += torch.bincount(y, minlength=num_classes).double()
    finally:
        for handle in handles:
            handle.remove()
    if images == 0:
        raise ValueError("no images to analyse: the data set given is empty")

    order = sorted({resolution[name] for name, _ in layers}, key=lambda hw: -hw[0] * hw[1])
    result = []
    n = counts.clamp(min=1)[:, None]
    for name, module in layers:
        mean = sums[name] / n
        std = (squares[name] / n - mean.square()).clamp(min=0).sqrt()
        result.append(LayerExcitation(name, type(module).__name__, order.index(resolution[name]), resolution[name],
                                      mean.cpu().numpy(), std.cpu().numpy(), counts.cpu().numpy().astype(int)))
    return ExcitationStats(result, list(classes), correct / images, images)


@contextmanager
def mean_gates(model: nn.Module, stats: ExcitationStats, stage: int) -> Iterator[nn.Module]:
    """Inside the block, every gate of ``stage`` outputs its data-set mean per channel for any input: the
    model runs as if those layers had constant gates. The hooks are removed on leaving."""
    modules = dict(attention_layers(model))
    handles = []
    for layer in stats.stages()[stage]:
        constant = torch.as_tensor(layer.mean, dtype=torch.float32)

        def fixed(_module, _args, gate: torch.Tensor, constant=constant):
            return constant.to(gate.device, gate.dtype).reshape(1, *gate.shape[1:]).expand_as(gate)
        handles.append(modules[layer.name].gate.register_forward_hook(fixed))
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def replaced_gate_accuracy(model: nn.Module, loader: Iterable, stats: ExcitationStats, stage: int, *,
                           device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy over ``loader`` with every gate of ``stage`` replaced by its data-set mean per channel
    (:func:`mean_gates`): if it barely moves, the network does not need class-specific (or even
    image-specific) gating there."""
    device = torch.device(device)
    model.eval().to(device)
    correct = images = 0
    with mean_gates(model, stats, stage):
        for x, y in _batches(loader, device):
            correct += (model(x).argmax(1) == y).sum().item()
            images += len(y)
    return correct / max(images, 1)


def stage_label(stats: ExcitationStats, stage: int) -> str:
    h, w = stats.stages()[stage][0].resolution
    return f"stage {stage + 1} ({h}x{w})"
