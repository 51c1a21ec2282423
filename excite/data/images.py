"""Decoding image files into upright 3-channel uint8 tensors, and a data set of such files."""
from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import io as tvio
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2 import functional as F

from excite.errors import DataError

#: File name endings treated as images (case-insensitive): torchvision's list plus GIF.
IMAGE_EXTENSIONS: tuple[str, ...] = (*IMG_EXTENSIONS, ".gif")
#: The most pixels an image may have unless told otherwise: PIL's own default limit against decompression bombs
#: (about 9,459 x 9,459, 256 MiB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485

# excite checks every image's size against its own limit (decode_image's max_pixels) from the file's header,
# before decoding, whichever decoder then runs. PIL's global check would instead warn at its fixed limit and
# refuse at twice that, in the header read itself, and only for the formats PIL decodes.
Image.MAX_IMAGE_PIXELS = None


class UnreadableImage(DataError):
    """An image file that neither torchvision nor PIL can decode."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = str(path)
        self.reason = reason


class ImageTooLarge(UnreadableImage):
    """An image with more pixels than the limit asked for (a decompression bomb, or just too large to train on)."""

    def __init__(self, path: str | os.PathLike, width: int, height: int, max_pixels: int) -> None:
        super().__init__(path, f"image of {width} x {height} = {width * height} pixels is above the limit of "
                               f"{max_pixels} (--max-pixels)")
        self.width, self.height, self.max_pixels = width, height, max_pixels


def is_image_file(name: str) -> bool:
    """Whether a file name has one of :data:`IMAGE_EXTENSIONS`."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def decode_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Decode an image file into a ``uint8`` RGB tensor of shape (3, H, W), rotated upright by its EXIF tag.

    torchvision decodes JPEG, PNG, GIF and WebP (including grayscale, alpha, palette, CMYK and 16-bit);
    PIL reads the rest (BMP, TIFF, PPM, ...). Raises :class:`UnreadableImage` when neither can, and
    :class:`ImageTooLarge` (before decoding, from the size in the file's header) for an image of more than
    ``max_pixels`` pixels; None sets no limit.
    """
    try:
        data = tvio.read_file(str(path))
    except RuntimeError:  # missing or unreadable: PIL's attempt below says why
        data = None
    if max_pixels is not None:
        size = _header_size(path if data is None else io.BytesIO(data.numpy()))  # the bytes read: no second open
        if size is not None and size[0] * size[1] > max_pixels:
            raise ImageTooLarge(path, *size, max_pixels)
    try:
        if data is None:
            raise RuntimeError(f"cannot read {path}")
        image = tvio.decode_image(data, mode=tvio.ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # torchvision's error for unsupported formats as well as for broken files
        image = _decode_with_pil(path)
    if image.ndim == 4:  # an animated GIF: keep its first frame
        image = image[0]
    if max_pixels is not None and image.shape[-2] * image.shape[-1] > max_pixels:  # a header PIL could not read
        raise ImageTooLarge(path, image.shape[-1], image.shape[-2], max_pixels)
    return F.to_dtype(image, torch.uint8, scale=True)  # 16-bit PNGs decode to uint16


def _header_size(file: str | os.PathLike | io.BytesIO) -> tuple[int, int] | None:
    """(width, height) from an image file's header, without decoding; None when PIL cannot tell."""
    try:
        with Image.open(file) as opened:  # lazy: reads the header only
            return opened.size
    except Exception:  # missing, broken or unknown to PIL: decoding will say why
        return None


def _decode_with_pil(path: str | os.PathLike) -> torch.Tensor:
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I"):
                # 16/32-bit grayscale (e.g. TIFF): PIL's convert("RGB") clips these values instead of scaling.
                image = Image.fromarray((np.asarray(image).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
            return F.pil_to_tensor(image.convert("RGB"))
    except Exception as error:  # PIL's format plugins raise assorted exception types on malformed files
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise UnreadableImage(path, "empty file" if empty else f"{type(error).__name__}: {error}") from error


class ImageFileDataset(Dataset):
    """Labelled image files, decoded by :func:`decode_image` and passed through ``transform``.

    ``samples`` are ``(path, class index)`` pairs; images of more than ``max_pixels`` pixels are refused as in
    :func:`decode_image`. Indexing raises :class:`UnreadableImage` for a file that has become unreadable since
    it was scanned; the loaders of :mod:`excite.data.loader` skip and count those.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], classes: Sequence[str],
                 transform: Callable | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = decode_image(path, self.max_pixels)
        if self.transform is not None:
            image = self.transform(image)
        return image, label
