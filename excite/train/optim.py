"""Optimizers and learning-rate schedules. The learning rate is a pure function of the step."""
from __future__ import annotations

import math

import torch
from torch import nn

from excite.train.config import TrainConfig
from excite.train.finetune import param_groups


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW over all parameters, in :func:`~excite.train.finetune.param_groups`: BatchNorm and bias
    parameters get no weight decay, the classifier's learn at ``lr * head_lr_mult``. The per-step schedule
    (LambdaLR) multiplies each group's own initial rate, so the classifier keeps its multiple throughout."""
    groups = param_groups(model, config)
    if config.opt == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.opt == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    return torch.optim.AdamW(groups, lr=config.lr)


def lr_factor(step: int, steps_per_epoch: int, config: TrainConfig) -> float:
    """Multiplier of ``config.lr`` at optimizer step ``step`` (0-based)."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.sched == "step":
        return config.gamma ** ((step // steps_per_epoch) // config.step_size)
    if config.sched == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if config.sched == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    # onecycle: when warmup is not given, the ramp takes the first 30% (Smith & Topin's default), from
    # lr/25 up to lr, then cosine down to lr/1e4.
    if warmup == 0:
        ramp = 0.3
        if progress < ramp:
            return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * progress / ramp))
        progress = (progress - ramp) / (1 - ramp)
    return 1e-4 + (1 - 1e-4) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, config: TrainConfig):
    """A per-step LambdaLR over :func:`lr_factor`; its state is just the step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, config))
