"""Transform presets (torchvision.transforms.v2) and batch-level MixUp/CutMix."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

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
#: The run options (TrainConfig fields, config.json keys) that refine a preset: the normalisation's ``mean`` and
#: ``std`` and the ``crop_pct`` of the centre crop; None keeps the preset's own. Pretrained weights set them.
INPUT_OPTIONS = ("mean", "std", "crop_pct")


def input_options(config: Mapping) -> dict:
    """The :data:`INPUT_OPTIONS` of a run's config (a dict, e.g. a checkpoint's ``"config"``), None where absent."""
    return {name: config.get(name) for name in INPUT_OPTIONS}


def normalization(preset: str, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std a preset normalises with: ``mean`` / ``std`` where given, else the preset's own."""
    own_mean, own_std = NORMALIZATION[preset]
    return tuple(mean) if mean is not None else own_mean, tuple(std) if std is not None else own_std


def resize_side(img_size: int, crop_pct: float) -> int:
    """The shorter side images are resized to before a centre crop of ``img_size`` keeps ``crop_pct`` of it (as
    timm rounds it: 224 at 0.875 is 256)."""
    return math.floor(img_size / crop_pct + 1e-6)


def build_transform(preset: str, img_size: int, *, train: bool, hflip: bool = True, augment: str | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    crop_pct: float | None = None) -> v2.Compose:
    """The per-image transform of a preset, from a PIL image or uint8 tensor to a normalized float tensor.

    "imagenet" resizes to ``img_size`` square, as the tutorials do, and flips training images at random
    (unless not ``hflip``); "cifar" also resizes (a no-op for 32-pixel CIFAR at ``img_size=32``) and adds
    the padded random crop. ``augment`` ("trivialaugment" or "randaugment") adds that policy to training.
    ``mean`` and ``std`` replace the preset's normalisation. ``crop_pct`` resizes the shorter side to
    ``img_size / crop_pct`` instead and crops ``img_size`` square from it: the centre for validation, a random
    place for training (the pretrained weights' own evaluation policy, e.g. torchvision's resize 256, crop 224).
    """
    if preset not in NORMALIZATION:
        raise DataError(f"unknown transform preset {preset!r}: choose one of {', '.join(PRESETS)}")
    if augment is not None and augment not in AUGMENTATIONS:
        raise DataError(f"unknown augmentation {augment!r}: choose one of {', '.join(AUGMENTATIONS)}")
    steps: list[v2.Transform] = [v2.ToImage()]
    if crop_pct is None:
        steps.append(v2.Resize([img_size, img_size]))
    else:
        steps += [v2.Resize(resize_side(img_size, crop_pct)),
                  v2.RandomCrop(img_size) if train else v2.CenterCrop(img_size)]
    if train:
        if preset == "cifar":
            steps.append(v2.RandomCrop(img_size, padding=CROP_PADDING["cifar"]))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
        if augment is not None:
            steps.append(AUGMENTATIONS[augment]())
    mean, std = normalization(preset, mean, std)
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


def describe_transform(preset: str, img_size: int, *, hflip: bool = True, augment: str | None = None,
                       mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                       crop_pct: float | None = None) -> str:
    """One line saying what :func:`build_transform` does to training images, e.g. for a run's header."""
    if crop_pct is None:
        steps = [f"resize to {img_size}x{img_size}"]
    else:
        steps = [f"resize the shorter side to {resize_side(img_size, crop_pct)}, random {img_size}x{img_size} crop "
                 f"(validation: the centre crop, {crop_pct:g} of the side)"]
    if preset == "cifar":
        steps.append(f"random {img_size}-px crop of the image padded by {CROP_PADDING['cifar']} px")
    if hflip:
        steps.append("random horizontal flip")
    if augment is not None:
        steps.append(augment)
    shown = lambda values: "(" + ", ".join(f"{v:.3f}" for v in values) + ")"  # noqa: E731
    own = mean is None and std is None
    mean, std = normalization(preset, mean, std)
    normalised = ("not normalised (pixels in [0, 1])" if preset == "plain" and own
                  else f"normalised with the {preset if own else 'given'} mean {shown(mean)} and std {shown(std)}")
    kept = "resize and crop" if crop_pct is not None else "resize"
    return f"{', '.join(steps)}; {normalised} (validation: the {kept} and normalisation only)"
