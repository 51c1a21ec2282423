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
#: What eval's and predict's ``--tta`` accept: auto is what the run validated with.
EVAL_TTA_CHOICES = ("auto", *CHOICES["tta"])
#: What ``--device`` accepts: the same grammar for train, eval, predict and bench (see excite.environment).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
#: PIL's own limit against decompression bombs: 89,478,485 pixels, about a 9,459 x 9,459 image (256 MiB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485


def option(default: Any = dataclasses.MISSING, *, help: str, group: str, factory: Any = dataclasses.MISSING,
           flag: str | None = None, internal: bool = False) -> Any:
    """A TrainConfig field with what ``excite train`` needs to offer it as a flag: its ``help`` text and the
    ``group`` it is listed under (``flag`` overrides the flag's name; ``internal`` fields have no flag)."""
    metadata = {"help": help, "group": group, "flag": flag, "internal": internal}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


#: The groups of ``excite train --help``, in order.
OPTION_GROUPS = ("model", "data", "optimisation", "run")


@dataclass
class TrainConfig:
    """Everything that defines a run, and the one place an option is defined: ``excite train``'s flags, config
    files and sweep axes are these fields (their metadata holds the flag's help). Saved as ``config.json``."""

    model: str = option("se_densenet121", group="model", help="model name (see `excite models`)")
    model_kwargs: dict[str, Any] = option(
        factory=dict, group="model", flag="--model-arg",
        help="builder override, e.g. growth_rate=12 or block_config=[4,4,4] (repeatable)")
    pretrained: Optional[str] = option(
        None, group="model",
        help="weights to start from: a file (excite, torchvision or timm layout), a URL, torchvision (the default "
             "torchvision weights of the model), a torchvision weights name (IMAGENET1K_V1, "
             "ResNet50_Weights.IMAGENET1K_V2) or timm:NAME[.TAG] (e.g. timm:seresnet50.a1_in1k); named weights "
             "also set --mean, --std, --crop-pct and --img-size unless --preset or --img-size is given")
    # 0: nothing frozen; N: the first N epochs train the classifier alone; -1 (or "all" as a flag): the whole run.
    freeze: int = option(0, group="model",
                         help="train only the classifier for the first N epochs, then everything; -1 or all: for "
                              "the whole run (the frozen layers' BatchNorm statistics stay as loaded)")

    data: str = option("digits", group="data",
                       help="image folder (one subfolder per class), or cifar10, cifar100, digits")
    data_root: Optional[str] = option(None, group="data", help="where CIFAR is stored or downloaded to")
    # The tutorials hold out 20% of the folder.
    val_split: float = option(0.2, group="data", help="fraction held out for validation (default 0.2)")
    val_dir: Optional[str] = option(None, group="data", help="a separate validation folder instead of a split")
    data_layout: str = option(
        "auto", group="data",
        help="auto (default): a folder of train/ and val/ (or test/) subfolders, each holding the same class "
             "folders, is used as that split; classes: every top-level folder is a class")
    img_size: Optional[int] = option(None, group="data",
                                     help="side of the square input (default 224, or 32 for the cifar preset)")
    preset: str = option("auto", group="data",
                         help="input pipeline: imagenet (resize, ImageNet statistics), cifar (pad-crop, CIFAR "
                              "statistics), plain (resize, no normalisation); auto: cifar for images up to 64 px")
    mean: Optional[list[float]] = option(
        None, group="data", help="per-channel mean (R G B) to normalise with instead of the preset's")
    std: Optional[list[float]] = option(
        None, group="data", help="per-channel std (R G B) to normalise with instead of the preset's")
    crop_pct: Optional[float] = option(
        None, group="data",
        help="resize the shorter side to img-size/crop-pct and crop img-size square (the centre for validation) "
             "instead of resizing to img-size")
    # Off for data where a mirror image changes the class (digits, text).
    hflip: bool = option(True, group="data", help="random horizontal flips of training images (default on)")
    augment: Optional[str] = option(None, group="data", help="extra per-image augmentation")
    mixup: float = option(0.0, group="data", help="mixup alpha: Beta(alpha, alpha) mixing (0 = off)")
    cutmix: float = option(0.0, group="data", help="cutmix alpha (0 = off)")
    strict: bool = option(False, group="data", help="fail on unreadable images instead of skipping them")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, group="data",
                             help="skip images with more pixels than this as unreadable (default 89,478,485, "
                                  "PIL's limit against decompression bombs)")
    # None: on for CIFAR-size images (the "cifar" preset) up to 2 GiB when no per-image --augment is asked for.
    cache_images: Optional[bool] = option(
        None, group="data",
        help="decode the data set once into device memory and augment there (default: on for CIFAR-size images)")
    # -1: excite.data.loader.default_workers (up to 4 on CUDA, none on the CPU).
    workers: int = option(-1, group="data", help="data loader processes (default: auto)")

    epochs: int = option(20, group="optimisation", help="epochs to train (default 20)")
    batch_size: int = option(64, group="optimisation",
                             help="images per step (default 64; cut to the training set's size if larger)")
    lr: float = option(0.05, group="optimisation", help="peak learning rate (default 0.05)")
    opt: str = option("sgd", group="optimisation", help="optimizer (default sgd)")
    momentum: float = option(0.9, group="optimisation", help="SGD momentum (default 0.9)")
    nesterov: bool = option(False, group="optimisation", help="Nesterov momentum (SGD only)")
    weight_decay: float = option(5e-4, group="optimisation",
                                 help="weight decay of conv and linear weights (default 5e-4; none on BN and biases)")
    sched: str = option("cosine", group="optimisation", help="learning-rate schedule, stepped every batch")
    step_size: int = option(5, group="optimisation", help="epochs between decays with --sched step (default 5)")
    gamma: float = option(0.1, group="optimisation", help="decay factor with --sched step (default 0.1)")
    head_lr_mult: float = option(1.0, group="optimisation",
                                 help="the classifier's learning rate is --lr times this (default 1)")
    warmup_epochs: float = option(0.0, group="optimisation", help="linear warm-up, in epochs (fractions allowed)")
    label_smoothing: float = option(0.0, group="optimisation", help="label smoothing of the loss (default 0)")
    # "flip" averages each image's logits with its mirror image's, in validation and in eval/predict of the run.
    tta: str = option("none", group="optimisation",
                      help="test-time augmentation of validation: flip averages each image with its mirror")

    recipe: Optional[str] = option(None, group="run", help="a tuned option set; other options override it")
    out: Optional[str] = option(None, group="run", help="run directory (default runs/<model>-<time>)")
    checkpoint_minutes: float = option(
        10.0, group="run", help="also checkpoint inside an epoch this often (default 10; 0: after every step)")
    save: str = option("best", group="run",
                       help="best (default): last.pt to resume and best.safetensors, the best weights; all: also "
                            "best.pt, a full checkpoint of the best epoch; last: last.pt alone")
    logger: Optional[str] = option(
        None, group="run", help="also log to TensorBoard: event files in the run directory (tensorboard --logdir "
                                "runs/); needs pip install 'excite[tensorboard]'")
    progress_seconds: float = option(
        30.0, group="run",
        help="without a terminal (a log file, a notebook, nohup), print a progress line this often inside an "
             "epoch (default 30; 0: off)")
    seed: int = option(0, group="run", help="seed of the split, the data order, augmentation and initial weights")
    device: str = option("auto", group="run", help=DEVICE_HELP)
    amp: Optional[str] = option(None, group="run", help="mixed precision")
    channels_last: bool = option(False, group="run", help="channels-last memory format")
    compile: bool = option(False, group="run", help="torch.compile the model")
    # Under torchrun each process normalises by its own part of the batch unless this is on.
    sync_bn: bool = option(False, group="run",
                           help="under torchrun, batch norm statistics over all processes' images (SyncBatchNorm)")
    # Set by fit() when the run starts and kept in its config.json and checkpoints, so that a checkpoint of
    # another run copied into the directory is refused instead of resumed.
    run_id: Optional[str] = option(None, group="run", internal=True, help="the run's id, set by fit()")

    def validate(self) -> "TrainConfig":
        """Raise ExciteError with one line for the first value that cannot work: a value of the wrong type, a
        non-finite number, one out of range, or options that contradict each other."""
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name))
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
            (self.freeze >= -1, f"--freeze must be a number of epochs, or -1 (all) for the whole run, got "
                                f"{self.freeze}"),
            (self.freeze < self.epochs, f"--freeze {self.freeze} covers all {self.epochs} epochs: use --freeze all "
                                        "(-1) to train the classifier alone for the whole run"),
            (self.head_lr_mult > 0, f"--head-lr-mult must be positive, got {self.head_lr_mult}"),
            (self.crop_pct is None or 0 < self.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {self.crop_pct}"),
            (not (self.crop_pct and self.cache_images), "--cache-images resizes whole images and cannot crop them "
                                                        "as --crop-pct asks: drop one of them"),
            (self.std is None or all(v > 0 for v in self.std), f"--std must be positive, got {self.std}"),
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


def _field_types() -> dict[str, tuple[type, bool]]:
    """Each TrainConfig field's type with Optional removed (bool, int, float, str or dict), and whether None is
    allowed."""
    types = {}
    for name, annotation in typing.get_type_hints(TrainConfig).items():
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = typing.get_origin(annotation) is typing.Union
        kind = args[0] if optional else annotation
        types[name] = (typing.get_origin(kind) or kind, optional)
    return types


_FIELD_TYPES = _field_types()


def option_type(name: str) -> type:
    """The type of TrainConfig field ``name``, Optional removed: bool, int, float, str or dict."""
    return _FIELD_TYPES[name][0]


def _check_type(name: str, value: Any) -> None:
    """One line if ``value`` does not have the option's type (a config file can hold anything)."""
    origin, optional = _FIELD_TYPES[name]
    if optional and value is None:
        return
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
    elif origin is list:  # the per-channel mean and std
        ok, what = (isinstance(value, list) and len(value) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value),
            "three finite numbers (R G B)")
    elif origin is dict:
        ok, what = isinstance(value, dict) and all(isinstance(k, str) for k in value), "a table of KEY = VALUE"
    else:  # pragma: no cover - a new field of a type this function does not know yet
        raise TypeError(f"TrainConfig.{name} has a type _check_type does not know: {origin}")
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
