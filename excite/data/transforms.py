"""Transform presets (torchvision.transforms.v2) and batch-level MixUp/CutMix."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision.transforms import v2

from excite.errors import DataError

#: Per-channel mean and std used to normalize inputs, by preset.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # The statistics of ImageNet's training set, as in the tutorials and torchvision's pretrained weights.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # The statistics of CIFAR-10's 50,000 training images.
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    # No normalisation: pixels stay in [0, 1], as after a bare ToTensor() (the SE-ResNet-50 tutorial's pipeline).
    "plain": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
PRESETS = tuple(NORMALIZATION)
AUGMENTATIONS: dict[str, Callable[[], v2.Transform]] = {
    "trivialaugment": v2.TrivialAugmentWide,
    "randaugment": v2.RandAugment,
}

#: Zero padding of the "cifar" preset's random crop: the standard 4 pixels of a 32-pixel CIFAR image.
CROP_PADDING = {"cifar": 4, "imagenet": 0, "plain": 0}


def build_transform(preset: str, img_size: int, *, train: bool, hflip: bool = True,
                    augment: str | None = None) -> v2.Compose:
    """The per-image transform of a preset, from a PIL image or uint8 tensor to a normalized float tensor.

    "imagenet" resizes to ``img_size`` square, as the tutorials do, and flips training images at random
    (unless not ``hflip``); "cifar" also resizes (a no-op for 32-pixel CIFAR at ``img_size=32``) and adds
    the padded random crop. ``augment`` ("trivialaugment" or "randaugment") adds that policy to training.
    """
    if preset not in NORMALIZATION:
        raise DataError(f"unknown transform preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if augment is not None and augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    steps: list[v2.Transform] = [v2.ToImage(), v2.Resize([img_size, img_size])]
    if train:
        if preset == "cifar":
            steps.append(v2.RandomCrop(img_size, padding=CROP_PADDING["cifar"]))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment is not None:
            steps.append(AUGMENTATIONS[augment]())
    mean, std = NORMALIZATION[preset]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    return v2.Compose(steps)


def batch_mixer(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> Callable | None:
    """A callable ``(images, labels) -> (mixed images, soft labels)`` for training batches, or None if both
    alphas are 0. With both set, each batch gets MixUp or CutMix at random."""
    mixers = []
    if mixup_alpha > 0:
        mixers.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        mixers.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def describe_transform(preset: str, img_size: int, *, hflip: bool = True, augment: str | None = None) -> str:
    """One line saying what :func:`build_transform` does to training images, e.g. for a run's header."""
    steps = [f"resize to {img_size}x{img_size}"]
    if preset == "cifar":
        steps.append(f"random {img_size}-px crop of the image padded by {CROP_PADDING['cifar']} px")
    if hflip:
        steps.append("random horizontal flip")
    if augment is not None:
        steps.append(augment)
    mean, std = NORMALIZATION[preset]
    shown = lambda values: "(" + ", ".join(f"{v:.3f}" for v in values) + ")"  # noqa: E731
    normalised = ("not normalised (pixels in [0, 1])" if preset == "plain"
                  else f"normalised with the {preset} mean {shown(mean)} and std {shown(std)}")
    return f"{', '.join(steps)}; {normalised} (validation: the resize and normalisation only)"
