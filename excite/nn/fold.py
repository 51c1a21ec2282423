"""Inference without BatchNorm: each BatchNorm that directly follows a convolution folded into it.

In eval mode a BatchNorm is a fixed per-channel affine map, so ``bn(conv(x))`` equals one convolution
with scaled weights and a bias. Folding removes a pass over every such activation: ResNet-style
blocks (conv -> BN throughout) lose all their BatchNorms; a DenseNet about half, the stem's and the BN
after each layer's bottleneck conv, since elsewhere it applies BN -> ReLU -> conv to features that
several layers read.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every foldable BatchNorm folded into its convolution.

    The graph is found by ``torch.fx`` tracing; a BatchNorm is folded only when it is the sole user of
    a convolution's output. The copy computes the same function as ``model.eval()`` up to float
    rounding and is meant for inference only (it has no BatchNorm left to train). ``model`` itself is
    left unchanged. A model that torch.fx cannot trace (data-dependent control flow in a custom
    layer) is returned as a plain eval-mode copy, with a warning.
    """
    model = copy.deepcopy(model).eval()
    try:
        return fuse(model, inplace=True)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError) as e:
        warnings.warn(f"{type(model).__name__} cannot be traced by torch.fx ({e}); BatchNorm left unfolded",
                      stacklevel=2)
        return model
