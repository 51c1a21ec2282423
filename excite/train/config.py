"""The one description of a training run: a typed dataclass, read from a file and overridden by flags."""
from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from excite.errors import ExciteError
from excite.train.recipes import RECIPES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CHOICES = {
    "opt": ("sgd", "adam", "adamw"),
    "sched": ("step", "cosine", "onecycle", "constant"),
    "amp": (None, "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda", "mps"),
    "preset": ("auto", "imagenet", "cifar"),
    "augment": (None, "trivialaugment", "randaugment"),
    "tta": ("none", "flip"),
}


@dataclass
class TrainConfig:
    """Everything that defines a run. Saved as ``config.json`` in the run directory."""

    # model
    model: str = "se_densenet121"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # builder overrides, e.g. {"growth_rate": 12}
    pretrained: Optional[str] = None  # weights file to start from (torchvision, timm or excite layout)
    # data
    data: str = "digits"  # an ImageFolder path, or cifar10 / cifar100 / digits
    data_root: Optional[str] = None  # where CIFAR lives or is downloaded to
    val_split: float = 0.2  # the tutorials hold out 20% of the folder
    val_dir: Optional[str] = None
    img_size: Optional[int] = None  # None: 32 for the CIFAR preset, 224 otherwise
    preset: str = "auto"
    hflip: bool = True  # off for data where a mirror image changes the class (digits, text)
    augment: Optional[str] = None
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 turns it off
    cutmix: float = 0.0
    strict: bool = False  # unreadable images are an error instead of being skipped
    # Decode the whole set once into memory on the training device and augment whole batches there.
    # None: on for CIFAR-size images (the "cifar" preset) up to 2 GiB when no per-image --augment is asked for.
    cache_images: Optional[bool] = None
    workers: int = -1  # -1: excite.data.loader.default_workers (up to 4 on CUDA, none on the CPU)
    # optimisation
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.05
    opt: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    sched: str = "cosine"
    step_size: int = 5  # StepLR period in epochs, as seed 002
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    # run
    recipe: Optional[str] = None  # a named option set from excite.train.recipes, applied under the flags
    checkpoint_minutes: float = 10.0  # also checkpoint inside an epoch this often (0: after every step)
    out: Optional[str] = None  # None: runs/<model>-<timestamp>
    seed: int = 0
    device: str = "auto"
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    # Test-time augmentation of validation (and of eval/predict with this run's weights): "flip" averages
    # each image's logits with its mirror image's.
    tta: str = "none"

    def validate(self) -> "TrainConfig":
        """Raise ExciteError with one line for the first value that cannot work."""
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                shown = ", ".join(str(c) for c in choices)
                flag = f"--{name.replace('_', '-')}"
                raise ExciteError(f"{flag} {getattr(self, name)!r} is not valid: choose one of {shown}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 < self.val_split < 1, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (self.img_size is None or self.img_size >= 8, f"--img-size must be at least 8, got {self.img_size}"),
            (self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.checkpoint_minutes >= 0, f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (self.tta != "flip" or self.hflip, "--tta flip needs --hflip: a model that never saw mirrored "
                                               "images should not be judged on them; add --tta none"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExciteError(message)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExciteError(f"{source}: unknown option(s) {', '.join(unknown)}; see `excite train --help`")
        return cls(**values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a TOML or JSON file (keys are the dataclass field names, e.g. ``batch_size``)."""
    path = Path(path)
    if not path.is_file():
        raise ExciteError(f"config file {path} does not exist")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
        else:
            values = tomllib.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise ExciteError(f"cannot parse config file {path}: {e}") from None
    return {k.replace("-", "_"): v for k, v in values.items()}


def resolve_config(config_file: str | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then the config file, then explicit overrides (flags); validated."""
    values: dict[str, Any] = read_config_file(config_file) if config_file else {}
    source = str(config_file or "options")
    values.update({k: v for k, v in overrides.items() if v is not None})
    recipe = values.get("recipe")
    if recipe is not None:
        if recipe not in RECIPES:
            raise ExciteError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
        values = {**RECIPES[recipe], **values}
    return TrainConfig.from_dict(values, source).validate()
