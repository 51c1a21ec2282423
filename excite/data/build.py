"""The one entry point of the data layer: :func:`build_data` turns a source name or folder into data sets."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from excite.data.folder import ScanReport, cache_dir, scan_folder, stratified_split
from excite.data.images import ImageFileDataset
from excite.data.sources import CIFAR, CifarImages, digits_folder, load_cifar
from excite.data.transforms import build_transform
from excite.errors import DataError

#: Folders whose images are all at most this many pixels a side get the "cifar" preset under "auto".
SMALL_IMAGE_SIDE = 64


@dataclass
class DataBundle:
    """Training and validation sets, their class names, the transform settings and what the scan found."""

    train: Dataset
    val: Dataset
    classes: list[str]
    preset: str
    img_size: int
    report: ScanReport = field(default_factory=ScanReport)  # empty for CIFAR


def build_data(source: str | os.PathLike, *, img_size: int | None = None, batch_size: int, val_split: float = 0.2,
               val_dir: str | os.PathLike | None = None, data_root: str | os.PathLike | None = None,
               preset: str = "auto", hflip: bool = True, augment: str | None = None, seed: int = 0,
               strict: bool = False, download: bool = True) -> DataBundle:
    """Load ``source``: "digits", "cifar10", "cifar100" or the path of an image folder ``root/<class>/<image>``.

    A folder is scanned (see :func:`scan_folder`) and split by class into training and ``val_split``
    validation images with ``seed``, unless ``val_dir`` gives a validation folder with the same classes.
    CIFAR is split the same way (its test set stays out of training and model selection: see
    :func:`cifar_test_set`) and lives in ``data_root`` (default: the excite cache), downloaded there when
    missing if ``download``. ``preset`` "auto" picks "cifar" for CIFAR and for folders of images at
    most 64 pixels a side, "imagenet" otherwise; ``img_size`` None picks 32 for "cifar", 224 otherwise.
    ``hflip`` and ``augment`` ("trivialaugment", "randaugment") set the training augmentation. Get loaders
    with :func:`~excite.data.loader.make_loader`.
    """
    name = str(source)
    if name in CIFAR:
        if val_dir is not None:
            raise DataError(f"--val-dir cannot be used with {name}: its validation images are held out of its "
                            "training set; set how many with --val-split")
        preset = "cifar" if preset == "auto" else preset
        img_size = img_size or _default_img_size(preset)
        source = load_cifar(name, cifar_root(data_root), train=True, download=download)
        # Validation is held out of the training set, like a folder's: the test set must not pick the model.
        train_part, val_part = stratified_split(list(enumerate(source.targets)), val_split, seed)
        train = CifarImages(source, [i for i, _ in train_part],
                            build_transform(preset, img_size, train=True, hflip=hflip, augment=augment))
        val = CifarImages(source, [i for i, _ in val_part], build_transform(preset, img_size, train=False))
        classes, report = list(source.classes), ScanReport()
    else:
        scan = scan_folder(digits_folder() if name == "digits" else source, strict=strict)
        report = scan.report
        if val_dir is None:
            train_samples, val_samples = stratified_split(scan.samples, val_split, seed)
            largest_side = scan.largest_side
        else:
            val_scan = scan_folder(val_dir, strict=strict)
            if val_scan.classes != scan.classes:
                raise DataError(
                    f"classes of --val-dir {val_scan.root} differ from those of {scan.root}: only in training: "
                    f"{sorted(set(scan.classes) - set(val_scan.classes))}, only in validation: "
                    f"{sorted(set(val_scan.classes) - set(scan.classes))}")
            train_samples, val_samples = scan.samples, val_scan.samples
            report = report.merge(val_scan.report)
            largest_side = max(scan.largest_side, val_scan.largest_side)
        if preset == "auto":
            preset = "cifar" if largest_side <= SMALL_IMAGE_SIDE else "imagenet"
        img_size = img_size or _default_img_size(preset)
        classes = scan.classes
        train = ImageFileDataset(train_samples, classes,
                                 build_transform(preset, img_size, train=True, hflip=hflip, augment=augment))
        val = ImageFileDataset(val_samples, classes, build_transform(preset, img_size, train=False))
    if batch_size > len(train):
        raise DataError(f"batch size {batch_size} is larger than the {len(train)} training images: "
                        f"use a batch size of at most {len(train)}")
    return DataBundle(train, val, classes, preset, img_size, report)


def _default_img_size(preset: str) -> int:
    # CIFAR's own 32 pixels; 224, the ImageNet size the tutorials and pretrained weights use.
    return 32 if preset == "cifar" else 224


def cifar_root(data_root: str | os.PathLike | None) -> Path:
    """Where CIFAR is read from and downloaded to: ``data_root``, else ``cache_dir()/cifar``."""
    return Path(data_root) if data_root is not None else cache_dir() / "cifar"


def cifar_test_set(name: str, *, img_size: int, preset: str = "cifar", data_root: str | os.PathLike | None = None,
                   download: bool = True) -> CifarImages:
    """The official test set of "cifar10" or "cifar100" with the evaluation transform, for a final measurement."""
    source = load_cifar(name, cifar_root(data_root), train=False, download=download)
    return CifarImages(source, range(len(source.targets)), build_transform(preset, img_size, train=False))
