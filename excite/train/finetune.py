"""Fine-tuning controls: inputs that follow the pretrained weights, a frozen backbone, a faster classifier.

- :func:`follow_weights`: the run takes the weights' preset, size, normalisation and crop unless the user set
  ``--preset`` (then the preset decides, as without weights) or the part itself (``--img-size``, ``--mean``...).
- :func:`param_groups`: the optimizer's groups; the classifier's learn at ``lr * head_lr_mult``.
- :func:`apply_freeze`: before each epoch, freeze or unfreeze everything but the classifier (``--freeze``).
  The state is a function of the epoch alone, so a resumed run gets it back by calling it again.

The classifier is the model's ``get_classifier()`` (see :class:`~excite.models._base.ClassifierModel`).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from torch import nn

from excite.errors import ExciteError
from excite.models.pretrained import PretrainedWeights
from excite.train.config import TrainConfig

# The model attribute holding the forward pre-hook that keeps frozen BatchNorms in eval mode, while frozen.
_HOOK = "_excite_frozen_norms"


def follow_weights(config: TrainConfig, weights: Optional[PretrainedWeights],
                   log: Callable[[str], None] = print) -> TrainConfig:
    """``config`` with the input pipeline of ``weights`` (see the module docstring), saying so through ``log``; a
    ``--preset`` whose normalisation differs from the weights' is kept, with a warning."""
    wanted = weights.preprocessing if weights is not None else None
    if wanted is None:
        return config
    shown = lambda values: "(" + ", ".join(f"{v:.3f}" for v in values) + ")"  # noqa: E731
    if config.preset != "auto":
        from excite.data.transforms import normalization

        theirs = normalization(wanted.preset, wanted.mean, wanted.std)
        ours = normalization(config.preset, config.mean, config.std)
        if ours != theirs:
            log(f"Warning: --preset {config.preset} normalises with mean {shown(ours[0])} and std {shown(ours[1])}, "
                f"but {weights.description} was trained on {wanted.img_size}-px images normalised with mean "
                f"{shown(theirs[0])} and std {shown(theirs[1])}: its features start off their inputs. Leave out "
                "--preset to follow the weights")
        return config
    followed = dataclasses.replace(
        config, preset=wanted.preset, img_size=config.img_size or wanted.img_size,
        mean=config.mean or (list(wanted.mean) if wanted.mean else None),
        std=config.std or (list(wanted.std) if wanted.std else None),
        # The image cache resizes whole images; it cannot take a crop policy (validate() says so when both are set).
        crop_pct=config.crop_pct or (None if config.cache_images else wanted.crop_pct)).validate()
    crop = f", centre crop {followed.crop_pct:g}" if followed.crop_pct else ""
    normalised = (f"mean {shown(followed.mean)}, std {shown(followed.std)}" if followed.mean and followed.std
                  else f"{followed.preset} normalisation")
    log(f"Inputs follow {weights.description}: {followed.preset} preset, {followed.img_size} px{crop}, {normalised} "
        "(set --preset or --img-size to choose otherwise)")
    return followed


def _classifier(model: nn.Module) -> nn.Module:
    get = getattr(model, "get_classifier", None)
    if get is None:
        raise ExciteError(f"{type(model).__name__} has no get_classifier(): --freeze and --head-lr-mult need to know "
                          "which layers are the classifier")
    return get()


def param_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: weights with ``config.weight_decay``, BatchNorm parameters and biases
    without; with ``head_lr_mult`` other than 1, the classifier's in two more groups at ``lr * head_lr_mult``.
    The first group is always the backbone's (its rate is the one the run reports)."""
    head = {id(p) for p in _classifier(model).parameters()} if config.head_lr_mult != 1 else set()
    groups = []
    for in_head, lr in ((False, config.lr), (True, config.lr * config.head_lr_mult)):
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in head) == in_head]
        if in_head and not params:
            continue
        # Decaying BN scales and biases only shrinks them toward zero without regularising capacity.
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay, "lr": lr},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": lr}]
    return groups


def is_frozen(epoch: int, config: TrainConfig) -> bool:
    """Whether everything but the classifier is frozen in ``epoch`` (1-based)."""
    return config.freeze == -1 or epoch <= config.freeze


def apply_freeze(model: nn.Module, epoch: int, config: TrainConfig) -> Optional[str]:
    """Freeze (or unfreeze) everything but the classifier for ``epoch``, as ``config.freeze`` says: frozen
    parameters get no gradient (so the optimizer neither steps nor decays them) and frozen BatchNorm layers run
    in eval mode whatever ``model.train()`` says (their running statistics stay as loaded). Returns a line for
    the user when the state changes, else None."""
    frozen = is_frozen(epoch, config)
    if frozen == hasattr(model, _HOOK):
        return None
    head = _classifier(model)
    in_head = {id(p) for p in head.parameters()}
    for p in model.parameters():
        if id(p) not in in_head:
            p.requires_grad_(not frozen)
    if not frozen:
        getattr(model, _HOOK).remove()
        delattr(model, _HOOK)
        return f"Epoch {epoch}: the whole model trains from here on (--freeze {config.freeze})"
    head_modules = set(head.modules())
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head_modules]

    def keep_norms_in_eval(_module: nn.Module, _inputs) -> None:
        for norm in norms:
            norm.training = False

    setattr(model, _HOOK, model.register_forward_pre_hook(keep_norms_in_eval))
    until = ("the whole run" if config.freeze == -1 else f"epoch {epoch}" if epoch == config.freeze
             else f"epochs {epoch}-{config.freeze}")
    return (f"Epoch {epoch}: only the classifier trains for {until} (--freeze {config.freeze}); the rest is frozen, "
            "its BatchNorm statistics as loaded")
