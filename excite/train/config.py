"""The one description of a training run: a typed dataclass, read from a file and overridden by flags."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import typing
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
    "preset": ("auto", "imagenet", "cifar", "plain"),
    "augment": (None, "trivialaugment", "randaugment"),
    "tta": ("none", "flip"),
    # auto: a folder whose top level is train/ plus val/ (or test/), each of class folders, is used as that
    # split; classes: the top-level folders are the classes, whatever their names.
    "data_layout": ("auto", "classes"),
    # best: last.pt (to resume) and best.safetensors (the best weights); all: best.pt too, a full checkpoint of
    # the best epoch; last: last.pt alone.
    "save": ("best", "all", "last"),
    # tensorboard: event files in the run directory (pip install 'excite[tensorboard]').
    "logger": (None, "tensorboard"),
}
#: What ``--device`` accepts: the same grammar for train, eval, predict and bench (see excite.environment).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
#: PIL's own limit against decompression bombs: 89,478,485 pixels, about a 9,459 x 9,459 image (256 MiB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485


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
    data_layout: str = "auto"
    img_size: Optional[int] = None  # None: 32 for the CIFAR preset, 224 otherwise
    preset: str = "auto"
    hflip: bool = True  # off for data where a mirror image changes the class (digits, text)
    augment: Optional[str] = None
    mixup: float = 0.0  # Beta(alpha, alpha) of mixup; 0 turns it off
    cutmix: float = 0.0
    strict: bool = False  # unreadable images are an error instead of being skipped
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped as unreadable (decompression bombs)
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
    save: str = "best"
    # Without a terminal (a log file, a notebook, nohup), print a progress line this often inside an epoch; 0: never.
    progress_seconds: float = 30.0
    logger: Optional[str] = None  # also log to TensorBoard ("tensorboard"); metrics.csv/.jsonl are always written
    out: Optional[str] = None  # None: runs/<model>-<timestamp>
    seed: int = 0
    device: str = "auto"
    amp: Optional[str] = None
    channels_last: bool = False
    compile: bool = False
    # Test-time augmentation of validation (and of eval/predict with this run's weights): "flip" averages
    # each image's logits with its mirror image's.
    tta: str = "none"
    # Set by fit() when the run starts and kept in its config.json and checkpoints, so that a checkpoint of
    # another run copied into the directory is refused instead of resumed.
    run_id: Optional[str] = None

    def validate(self) -> "TrainConfig":
        """Raise ExciteError with one line for the first value that cannot work: a value of the wrong type, a
        non-finite number, one out of range, or options that contradict each other."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name])
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                shown = ", ".join(str(c) for c in choices)
                raise ExciteError(f"{_flag(name)} {getattr(self, name)!r} is not valid: choose one of {shown}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ExciteError(f"--device {self.device!r} is not valid: choose {DEVICE_HELP}")
        checks = [
            (self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (0 < self.val_split < 1, f"--val-split must be between 0 and 1, got {self.val_split}"),
            (self.img_size is None or self.img_size >= 8, f"--img-size must be at least 8, got {self.img_size}"),
            (self.step_size >= 1, f"--step-size must be at least 1, got {self.step_size}"),
            (self.gamma > 0, f"--gamma must be positive (the factor the learning rate is multiplied by), "
                             f"got {self.gamma}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (not self.nesterov or self.opt == "sgd", f"--nesterov applies to --opt sgd only, not {self.opt}"),
            (not self.nesterov or self.momentum > 0, "--nesterov needs a positive --momentum"),
            (0 <= self.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (self.checkpoint_minutes >= 0, f"--checkpoint-minutes must be >= 0, got {self.checkpoint_minutes}"),
            (self.progress_seconds >= 0, f"--progress-seconds must be >= 0, got {self.progress_seconds}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.mixup >= 0 and self.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
            (0 <= self.seed < 2**63, f"--seed must be a whole number from 0 to 2**63-1, got {self.seed}"),
            (self.workers >= -1, f"--workers must be 0 or more (or -1 for the default), got {self.workers}"),
            (self.max_pixels >= 1, f"--max-pixels must be at least 1, got {self.max_pixels}"),
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
        if not isinstance(values, dict):
            raise ExciteError(f"{source} holds a {type(values).__name__}, not a table of options (key = value)")
        # config.json records what the user asked for beside the resolved values; it is not an option.
        values = {k: v for k, v in values.items() if k != REQUESTED_KEY}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExciteError(f"{source}: unknown option(s) {', '.join(unknown)}; see `excite train --help`")
        return cls(**values)


#: The key of config.json that holds the options whose resolved value differs from what was asked for.
REQUESTED_KEY = "requested"


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


_FIELD_TYPES = typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """One line if ``value`` does not have the option's type (a config file can hold anything)."""
    args = typing.get_args(annotation)
    if type(None) in args:  # Optional[X]
        if value is None:
            return
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation) or annotation
    # bool is an int subclass in Python; as an option, true is not a number and 1 is not a switch.
    if origin is bool:
        ok, what = type(value) is bool, "true or false"
    elif origin is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "a whole number"
    elif origin is float:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if ok and not math.isfinite(value):
            raise ExciteError(f"{_flag(name)} must be a finite number, got {value}")
    elif origin is str:
        ok, what = isinstance(value, str), "a string"
    elif origin is dict:
        ok, what = isinstance(value, dict) and all(isinstance(k, str) for k in value), "a table of KEY = VALUE"
    else:  # pragma: no cover - a new field of a type this function does not know yet
        raise TypeError(f"TrainConfig.{name} has a type _check_type does not know: {annotation}")
    if not ok:
        raise ExciteError(f"{_flag(name)} must be {what}, got {value!r}")


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
    except (ValueError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ExciteError(f"cannot parse config file {path}: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ExciteError(f"config file {path} holds a {type(values).__name__}, not a table of options "
                          "(key = value)")
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
    config = TrainConfig.from_dict(values, source)
    try:
        return config.validate()
    except ExciteError as e:
        raise ExciteError(f"{config_file}: {e}" if config_file else str(e)) from None
