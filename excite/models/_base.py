"""What every excite model shares: the forward_features / forward_head split and a swappable head."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class ClassifierModel(nn.Module):
    """Base class: subclasses build a feature extractor and a Linear head stored under ``head_name``.

    ``forward_head`` pools globally (so any input size works), applies ``head_drop`` dropout and the
    head. Subclasses set ``num_features`` (the head's input width) and implement ``forward_features``.
    """

    head_name = "fc"

    def __init__(self, num_classes: int, num_features: int, head_drop: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = num_features
        self.head_drop = head_drop

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.head_drop > 0:
            x = F.dropout(x, p=self.head_drop, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """The feature extractor's parts in order, by dotted name: the children of ``features`` where the model
        keeps them in one Sequential (DenseNet, DPN, ResDense, as torchvision does), else the model's own
        children but the classifier (ResNet)."""
        features = getattr(self, "features", None)
        if isinstance(features, nn.Sequential):
            return [(f"features.{name}", module) for name, module in features.named_children()]
        return [(name, module) for name, module in self.named_children() if module is not self.get_classifier()]

    @property
    def feature_info(self) -> list[dict]:
        """timm's ``feature_info``: for each feature-map size the extractor produces, the last part of it
        (:meth:`stage_modules`) to output that size, as ``{"module", "num_chs", "reduction"}`` (reduction: the
        input's side over the map's), shallow to deep; the last entry's map is what the head pools. Found once,
        by one forward pass of a small input on the meta device (no memory, no arithmetic)."""
        if getattr(self, "_feature_info", None) is None:
            self._feature_info = _probe_feature_info(self)
        return [dict(info) for info in self._feature_info]

    def forward_intermediates(self, x: torch.Tensor, indices: list[int] | None = None,
                              intermediates_only: bool = False):
        """The feature maps listed in :attr:`feature_info` (those at ``indices``, default all) for ``x``, as
        timm's ``forward_intermediates``: ``(final features, [maps])``, or only the maps."""
        names = [info["module"] for info in self.feature_info]
        wanted = [names[i] for i in (range(len(names)) if indices is None else indices)]
        maps: dict[str, torch.Tensor] = {}
        modules = dict(self.named_modules())
        hooks = [modules[name].register_forward_hook(
            lambda _m, _i, out, name=name: maps.__setitem__(name, out)) for name in wanted]
        try:
            features = self.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        intermediates = [maps[name] for name in wanted]
        return intermediates if intermediates_only else (features, intermediates)

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it), as timm's models do.
        ``global_pool`` may only be None or "avg": excite models always pool by average."""
        if global_pool not in (None, "avg"):
            raise ValueError(f"global_pool must be 'avg' (excite models pool by average), got {global_pool!r}")
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.bias)
        setattr(self, self.head_name, head)
        self.num_classes = num_classes


# Any side works for the probe: every family downsamples 32x at most, leaving 2x2 of a 64-pixel input.
_PROBE_SIDE = 64


def _probe_feature_info(model: ClassifierModel) -> list[dict]:
    # A copy on the meta device runs the forward with shapes only, whatever device and size the model has.
    probe_model = copy.deepcopy(model).to("meta")
    conv = next(m for m in probe_model.modules() if isinstance(m, nn.Conv2d))
    outputs: list[tuple[str, tuple[int, ...]]] = []
    hooks = [module.register_forward_hook(
        lambda _m, _i, out, name=name: outputs.append((name, tuple(out.shape)))
        if isinstance(out, torch.Tensor) and out.ndim == 4 else None)
        for name, module in probe_model.stage_modules()]
    with torch.no_grad():
        probe_model.eval().forward_features(torch.empty(1, conv.in_channels, _PROBE_SIDE, _PROBE_SIDE, device="meta"))
    for hook in hooks:
        hook.remove()
    last_per_size: dict[int, tuple[str, int]] = {}
    for name, shape in outputs:  # in the order they ran; a later part at the same size replaces an earlier one
        last_per_size[shape[-1]] = (name, shape[1])
    return [{"module": name, "num_chs": channels, "reduction": _PROBE_SIDE // side}
            for side, (name, channels) in sorted(last_per_size.items(), reverse=True)]


def init_weights(model: nn.Module, conv_fan: str = "fan_in") -> None:
    """Kaiming-normal convolutions (He et al., 2015), BN at identity, zero Linear biases.

    ``conv_fan`` is "fan_in" for torchvision's DenseNet and "fan_out" for its ResNet.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode=conv_fan, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)
