"""Built-in data sources: scikit-learn's handwritten digits (as an image folder) and CIFAR-10/100."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets

from excite.data.folder import cache_dir
from excite.errors import DataError

CIFAR: dict[str, type[datasets.CIFAR10]] = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}

#: load_digits pixels count the set pixels (0..16) of a 4x4 block of the original 32x32 bitmap.
_DIGITS_MAX_PIXEL = 16


def digits_folder() -> Path:
    """scikit-learn's 1,797 8x8 grayscale handwritten digits as an image folder of PNGs, ``cache_dir()/digits``.

    Written once, into a temporary folder renamed into place, so that a reader never sees half of it; after
    that the digits take the same path as any user folder.
    """
    folder = cache_dir() / "digits"
    if folder.is_dir():
        return folder
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".digits-"))
    except OSError as error:
        raise DataError(f"cannot write the digits into {folder.parent} ({error.strerror or error}): set "
                        "EXCITE_CACHE_DIR to a writable folder") from None
    from sklearn.datasets import load_digits  # imported here: it takes a second and is needed only once

    digits = load_digits()
    try:
        for i, (pixels, label) in enumerate(zip(digits.images, digits.target)):
            (tmp / str(label)).mkdir(exist_ok=True)
            image = np.round(pixels * (255 / _DIGITS_MAX_PIXEL)).astype(np.uint8)
            Image.fromarray(image).save(tmp / str(label) / f"{i:04d}.png")
    except OSError as error:  # a full disk: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"cannot write the digits into {folder.parent} ({error.strerror or error}): free some "
                        "space there or set EXCITE_CACHE_DIR to another folder") from None
    try:
        os.rename(tmp, folder)
    except OSError:  # another process renamed its copy into place first
        shutil.rmtree(tmp)
    return folder


def load_cifar(name: str, root: str | os.PathLike, *, train: bool, download: bool) -> datasets.CIFAR10:
    """The training (``train``) or test set of ``name`` ("cifar10" or "cifar100") under ``root``, without
    transforms.

    Downloads it into ``root`` when missing and ``download`` is set; raises a one-line :class:`DataError`
    saying how to get it when it is missing and cannot be downloaded.
    """
    dataset, root = CIFAR[name], Path(root)
    try:
        return dataset(root, train=train, download=download)
    except (RuntimeError, OSError) as error:  # "Dataset not found", or urllib's URLError (an OSError)
        problem = (f"could not be downloaded ({type(error).__name__}: {' '.join(str(error).split())})" if download
                   else "is not there and downloading is off")
        raise DataError(f"{name} {problem}: download {dataset.url}, extract it into {root} (giving "
                        f"{root / dataset.base_folder}) and pass --data-root {root}") from error


class CifarImages(Dataset):
    """Some of a CIFAR set's images, as torchvision keeps them (uint8 ``data`` of shape (N, 32, 32, 3) and
    ``targets``), passed through ``transform``."""

    def __init__(self, source: datasets.CIFAR10, indices: Sequence[int], transform: Callable) -> None:
        self.data = source.data[np.asarray(indices, dtype=np.int64)]
        self.targets = [source.targets[i] for i in indices]
        self.classes = list(source.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]
