"""The one entry point of the data layer: :func:`build_data` turns a source name or folder into data sets."""
from __future__ import annotations

import os
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from excite.data.folder import FolderScan, ScanReport, cache_dir, resolve_layout, scan_folder, stratified_split
from excite.data.images import DEFAULT_MAX_PIXELS, ImageFileDataset
from excite.data.loader import drops_last_batch
from excite.data.sources import CIFAR, CifarImages, digits_folder, load_cifar
from excite.data.transforms import build_transform
from excite.errors import DataError

#: Folders whose images are all at most this many pixels a side get the "cifar" preset under "auto".
SMALL_IMAGE_SIDE = 64
#: How the keys of a ``--val-dir``'s images begin in :attr:`DataBundle.split`, apart from the training images'.
VAL_DIR_KEY = "<val-dir>/"


@dataclass
class DataBundle:
    """Training and validation sets, their class names, the transform settings and what the scan found.

    ``batch_size`` is the training batch size to use (the one asked for, or the training set's size if that is
    smaller). ``notes`` are lines for the user about how the data is used. ``split`` names the images on each
    side, ``{"train": [...], "val": [...]}``: paths relative to the data folder (those of a ``--val-dir``
    relative to it, after :data:`VAL_DIR_KEY`), or indices into CIFAR's training set; give it back to
    :func:`build_data` as ``recorded_split`` to keep the same sides.
    """

    train: Dataset
    val: Dataset
    classes: list[str]
    preset: str
    img_size: int
    report: ScanReport = field(default_factory=ScanReport)  # empty for CIFAR
    batch_size: int = 1
    notes: list[str] = field(default_factory=list)
    split: dict[str, list[str]] = field(default_factory=dict)
    # What refines the preset (see excite.data.transforms.INPUT_OPTIONS); None: the preset's own.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None


def build_data(source: str | os.PathLike, *, img_size: int | None = None, batch_size: int, val_split: float = 0.2,
               val_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
               preset: str = "auto", hflip: bool = True, augment: str | None = None, seed: int = 0,
               strict: bool = False, download: bool = True, data_layout: str = "auto",
               max_pixels: int = DEFAULT_MAX_PIXELS, recorded_split: dict[str, list[str]] | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               crop_pct: float | None = None) -> DataBundle:
    """Load ``source``: "digits", "cifar10", "cifar100" or the path of an image folder ``root/<class>/<image>``.

    A folder is scanned (see :func:`scan_folder`; images of more than ``max_pixels`` pixels are skipped) and
    split by class into training and ``val_split`` validation images with ``seed``, unless ``val_dir`` gives a
    validation folder with the same classes, or the folder itself is split into ``train/`` and ``val/`` (or
    ``test/``) folders of classes and ``data_layout`` is "auto" (see :func:`resolve_layout`).
    CIFAR is split the same way (its test set stays out of training and model selection: see
    :func:`cifar_test_set`) and lives in ``data_root`` (default: the excite cache), downloaded there when
    missing if ``download``. ``preset`` "auto" picks "cifar" for CIFAR and for folders of images at
    most 64 pixels a side, "imagenet" otherwise; ``img_size`` None picks 32 for "cifar", 224 otherwise.
    ``hflip`` and ``augment`` ("trivialaugment", "randaugment") set the training augmentation; ``mean``, ``std``
    and ``crop_pct`` refine the preset (see :func:`~excite.data.transforms.build_transform`). Get loaders
    with :func:`~excite.data.loader.make_loader` at the bundle's ``batch_size``.

    ``recorded_split`` (an earlier bundle's ``split``) keeps each image on the side it was on: images it does
    not name are left out, and a note says what changed.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    name = str(source)
    notes: list[str] = []
    refine = dict(mean=mean, std=std, crop_pct=crop_pct)
    if name in CIFAR:
        if val_dir is not None:
            raise DataError(f"--val-dir cannot be used with {name}: its validation images are held out of its "
                            "training set; set how many with --val-split")
        preset = "cifar" if preset == "auto" else preset
        img_size = img_size or _default_img_size(preset)
        cifar = load_cifar(name, cifar_root(data_root), train=True, download=download)
        samples = {str(i): (i, label) for i, label in enumerate(cifar.targets)}
        if recorded_split is None:
            # Validation is held out of the training set, like a folder's: the test set must not pick the model.
            train_part, val_part = stratified_split(list(samples.values()), val_split, seed)
        else:
            train_part, val_part = _keep_recorded(samples, recorded_split, notes)
        train = CifarImages(cifar, [i for i, _ in train_part],
                            build_transform(preset, img_size, train=True, hflip=hflip, augment=augment, **refine))
        val = CifarImages(cifar, [i for i, _ in val_part], build_transform(preset, img_size, train=False, **refine))
        classes, report = list(cifar.classes), ScanReport()
    else:
        root = digits_folder() if name == "digits" else source
        train_root, layout_val, note = resolve_layout(root, "classes" if name == "digits" else data_layout)
        scan = scan_folder(train_root, strict=strict, max_pixels=max_pixels)
        report, largest_side = scan.report, scan.largest_side
        prefix = f"{train_root.name}/" if layout_val is not None else ""
        samples = _keyed(scan, prefix)
        if val_dir is None and layout_val is None:
            if recorded_split is None:
                train_part, val_part = stratified_split(list(samples.values()), val_split, seed)
            else:
                train_part, val_part = _keep_recorded(samples, recorded_split, notes)
        else:
            if val_dir is not None:
                _check_apart(train_root, Path(val_dir))
                val_scan = scan_folder(val_dir, strict=strict, max_pixels=max_pixels)
                val_samples, what = _keyed(val_scan, VAL_DIR_KEY), f"--val-dir {val_scan.root}"
                if layout_val is not None:
                    note = (f"Training on {train_root.name}/ of {train_root.parent} and validating on --val-dir "
                            f"{val_scan.root}; {layout_val.name}/ is not used")
            else:
                val_scan = scan_folder(layout_val, strict=strict, max_pixels=max_pixels)
                val_samples, what = _keyed(val_scan, f"{layout_val.name}/"), f"{layout_val.name}/ of {root}"
            if val_scan.classes != scan.classes:
                raise DataError(
                    f"classes of {what} differ from those of {scan.root}: only in training: "
                    f"{sorted(set(scan.classes) - set(val_scan.classes))}, only in validation: "
                    f"{sorted(set(val_scan.classes) - set(scan.classes))}; give both the same class folders")
            report = report.merge(val_scan.report)
            largest_side = max(largest_side, val_scan.largest_side)
            if recorded_split is None:
                train_part, val_part = list(samples.values()), list(val_samples.values())
            else:
                train_part, val_part = _keep_recorded({**samples, **val_samples}, recorded_split, notes)
            samples = {**samples, **val_samples}
        if note:
            notes.insert(0, note)
        if preset == "auto":
            preset = "cifar" if largest_side <= SMALL_IMAGE_SIDE else "imagenet"
        img_size = img_size or _default_img_size(preset)
        classes = scan.classes
        train = ImageFileDataset(train_part, classes, max_pixels=max_pixels,
                                 transform=build_transform(preset, img_size, train=True, hflip=hflip, augment=augment,
                                                           **refine))
        val = ImageFileDataset(val_part, classes, build_transform(preset, img_size, train=False, **refine),
                               max_pixels=max_pixels)
    key_of = {sample: key for key, sample in samples.items()}
    split = {"train": [key_of[s] for s in train_part], "val": [key_of[s] for s in val_part]}
    if batch_size > len(train):
        notes.append(f"Batch size {batch_size} is larger than the {len(train)} training images: training in "
                     f"batches of {len(train)}")
        batch_size = len(train)
    if drops_last_batch(len(train), batch_size):
        notes.append(f"The last batch of 1 image is left out of each epoch ({len(train)} training images in batches "
                     f"of {batch_size}): batch norm cannot train on one image; it is another image each epoch")
    return DataBundle(train, val, classes, preset, img_size, report, batch_size, notes, split,
                      tuple(mean) if mean is not None else None, tuple(std) if std is not None else None, crop_pct)


def _keyed(scan: FolderScan, prefix: str) -> dict[str, tuple[str, int]]:
    """The samples of a scan by their key in :attr:`DataBundle.split`: ``prefix`` + the path in the folder."""
    return {prefix + Path(path).relative_to(scan.root).as_posix(): (path, label) for path, label in scan.samples}


def _keep_recorded(samples: dict[str, Hashable], recorded: dict[str, list[str]],
                   notes: list[str]) -> tuple[list, list]:
    """``samples`` (by key) put on the sides ``recorded`` gives them, leaving out those it does not name; notes
    what has changed, if anything."""
    if not isinstance(recorded, dict) or not all(isinstance(recorded.get(side), list) for side in ("train", "val")):
        raise DataError("the recorded split must be a dict of 'train' and 'val' lists of image keys: give the "
                        "split a DataBundle recorded, or none to split afresh")
    train = [samples[key] for key in recorded["train"] if key in samples]
    val = [samples[key] for key in recorded["val"] if key in samples]
    gone_train, gone_val = len(recorded["train"]) - len(train), len(recorded["val"]) - len(val)
    new = len(samples.keys() - set(recorded["train"]) - set(recorded["val"]))
    if not train or not val:
        raise DataError(f"none of the {len(recorded['train'] if not train else recorded['val'])} "
                        f"{'training' if not train else 'validation'} images of the split recorded in the run are "
                        "left in the data: restore them, or start a new run")
    if gone_train or gone_val or new:
        notes.append(f"The split recorded in the run is kept: {gone_train} of its training images and {gone_val} of "
                     f"its validation images are gone; {new} new image{' is' if new == 1 else 's are'} left out")
    return sorted(train), sorted(val)


def _check_apart(train_root: Path, val_dir: Path) -> None:
    """Refuse a validation folder that is, holds or lies inside the training folder."""
    train, val = train_root.expanduser().resolve(), val_dir.expanduser().resolve()
    relation = ("is" if train == val else "holds" if train.is_relative_to(val)
                else "is inside" if val.is_relative_to(train) else None)
    if relation:
        raise DataError(f"--val-dir {val} {relation} the training folder {train}: validation would see training "
                        f"images; give a validation folder apart from it, or leave out --val-dir to hold out "
                        f"--val-split of the training images")


def _default_img_size(preset: str) -> int:
    # CIFAR's own 32 pixels; 224, the ImageNet size the tutorials and pretrained weights use.
    return 32 if preset == "cifar" else 224


def cifar_root(data_root: str | os.PathLike | None) -> Path:
    """Where CIFAR is read from and downloaded to: ``data_root``, else ``cache_dir()/cifar``."""
    return Path(data_root) if data_root is not None else cache_dir() / "cifar"


def cifar_test_set(name: str, *, img_size: int, preset: str = "cifar", data_root: str | os.PathLike | None = None,
                   download: bool = True, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   crop_pct: float | None = None) -> CifarImages:
    """The official test set of "cifar10" or "cifar100" with the evaluation transform, for a final measurement."""
    source = load_cifar(name, cifar_root(data_root), train=False, download=download)
    transform = build_transform(preset, img_size, train=False, mean=mean, std=std, crop_pct=crop_pct)
    return CifarImages(source, range(len(source.targets)), transform)
