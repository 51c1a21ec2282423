"""What every excite model shares: the forward_features / forward_head split and a swappable head."""
from __future__ import annotations

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

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.head_name)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` (0 removes it)."""
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.bias)
        setattr(self, self.head_name, head)
        self.num_classes = num_classes


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
