"""The small-image fast path: decode once, keep the images on the device, augment whole batches there.

For data sets that fit in device memory (CIFAR-10's training set is 50,000 x 3 x 32 x 32 bytes, 147 MiB)
the per-image pipeline of a DataLoader (decode, PIL transforms, collate, copy to the GPU) costs more
than the model. :class:`TensorCache` holds every image as one uint8 tensor, decoded once and cached on
disk; :class:`CachedLoader` keeps it on the device and makes each batch with a few tensor ops: an index,
one gather for the padded random crop and flip of the whole batch, the conversion and normalisation.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torchvision.transforms.v2 import functional as TF

from excite.data.folder import cache_dir
from excite.data.images import DEFAULT_MAX_PIXELS, ImageFileDataset, decode_image
from excite.data.loader import drops_last_batch, shard
from excite.data.transforms import CROP_PADDING, NORMALIZATION, normalization
from excite.errors import DataError
from excite.io import atomic_write

#: Bump when the cached tensors change meaning (decoding, resizing), so old cache files are not reused.
_CACHE_VERSION = 1


@dataclass
class TensorCache:
    """A whole data set as two tensors: ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(f"cached images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} "
                            f"of shape {tuple(self.images.shape)}")
        self.labels = torch.as_tensor(self.labels, dtype=torch.int64, device=self.images.device)
        if self.labels.shape != self.images.shape[:1]:
            raise DataError(f"got {len(self.images)} images but {self.labels.numel()} labels: "
                            "pass one label per image")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike], labels: Sequence[int], *,
                   size: int | tuple[int, int] | None = None, cache_dir: str | os.PathLike | None = None,
                   max_pixels: int | None = DEFAULT_MAX_PIXELS) -> TensorCache:
        """Decode ``paths`` (RGB, upright, at most ``max_pixels`` each) into one tensor, resized to ``size`` if
        given.

        Without ``size`` every image must already have the same size. With ``cache_dir`` the result is
        stored there as a .safetensors file named by a hash of the file list (paths, sizes and
        modification times), the labels and ``size``, and loaded from it next time instead of decoding. A
        cache folder that cannot be read or written only costs the decoding: it gets a warning.
        """
        if len(paths) != len(labels):
            raise DataError(f"got {len(paths)} image files but {len(labels)} labels: pass one label per file")
        if not paths:
            raise DataError("no image files to cache: pass at least one")
        size = (size, size) if isinstance(size, int) else size
        cache_file = Path(cache_dir) / f"{_cache_key(paths, labels, size)}.safetensors" if cache_dir else None
        if cache_file is not None:
            try:
                return cls.load(cache_file)
            except (OSError, SafetensorError, KeyError, DataError):
                pass  # not there yet, unreadable or from elsewhere: decode again and overwrite it
        images = [decode_image(path, max_pixels) for path in paths]
        if size is not None:
            images = [TF.resize(image, list(size), antialias=True) for image in images]
        shapes = {tuple(image.shape[1:]) for image in images}
        if len(shapes) > 1:
            raise DataError(f"images have {len(shapes)} different sizes (e.g. {sorted(shapes)[:2]}): pass a size "
                            "to resize them to")
        cache = cls(torch.stack(images), torch.tensor(labels))
        if cache_file is not None:
            try:
                cache.save(cache_file)
            except OSError as error:  # a read-only or full cache folder must not stop training
                warnings.warn(f"cannot write the image cache into {cache_file.parent} ({error.strerror or error}); "
                              "going on without it: set EXCITE_CACHE_DIR to a writable folder to keep it",
                              stacklevel=2)
        return cache

    def save(self, path: str | os.PathLike) -> None:
        """Write the tensors to a .safetensors file, atomically."""
        data = safetensors.torch.save({"images": self.images.cpu().contiguous(), "labels": self.labels.cpu()})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            f.write(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> TensorCache:
        """Read a file written by :meth:`save`."""
        tensors = safetensors.torch.load_file(path)
        return cls(tensors["images"], tensors["labels"])


def _cache_key(paths: Sequence[str | os.PathLike], labels: Sequence[int], size: tuple[int, int] | None) -> str:
    try:
        stats = [os.stat(path) for path in paths]
    except OSError as error:
        raise DataError(f"cannot read image {error.filename}: {error.strerror}") from None
    files = [(str(path), stat.st_size, stat.st_mtime_ns) for path, stat in zip(paths, stats)]
    text = json.dumps([_CACHE_VERSION, files, [int(label) for label in labels], size])
    return hashlib.sha256(text.encode()).hexdigest()


class EpochPlan(NamedTuple):
    """What one epoch does: image ``order[i]`` comes i-th, cropped at (``top[i]``, ``left[i]``) of its padded
    copy and mirrored where ``flip[i]``."""

    order: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor,
              pad: int) -> torch.Tensor:
    """Crop each image of a batch (N, C, H, W) from its copy zero-padded by ``pad`` pixels at (``top``,
    ``left``), and mirror it left-right where ``flip``; the result has the input's shape.

    Image by image this is ``hflip(crop(pad(image), top, left, H, W))``, done as one gather whose column
    indices run backwards for the flipped images.
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = top[:, None] + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - cols, cols)
    batch = torch.arange(n, device=images.device)[:, None, None]
    # Index tensors around a slice put their broadcast dimensions first: the gather comes out (N, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class CachedLoader:
    """``(images, labels)`` batches of a :class:`TensorCache`, made and augmented on ``device``.

    With ``train`` each epoch visits the images in a random order, and each image is randomly cropped
    from its copy zero-padded by ``pad`` pixels and mirrored with probability 1/2 when ``flip`` (the
    standard CIFAR augmentation); without, the images come in order, unchanged. Either way the pixels
    are scaled to [0, 1] and normalised by ``mean`` and ``std``, then cast to ``dtype`` and, with
    ``channels_last``, laid out channels-last. Order and augmentation come from one generator on the
    device seeded from ``(seed, epoch)`` (see :meth:`plan`): call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, data: TensorCache, batch_size: int, *, train: bool, device: str | torch.device = "cpu",
                 mean: Sequence[float] = NORMALIZATION["cifar"][0],
                 std: Sequence[float] = NORMALIZATION["cifar"][1],
                 pad: int = 4, flip: bool = True, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if pad < 0:
            raise DataError(f"crop padding must be 0 or more pixels, got {pad}")
        if not dtype.is_floating_point:
            raise DataError(f"batches must have a floating-point dtype, got {dtype}")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.drop_last = batch_size, train, drop_last
        self.mean, self.std, self.pad, self.flip = list(mean), list(std), pad, flip
        self.dtype = dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.seed, self.epoch, self.start_batch = seed, 0, 0
        self.rank, self.world_size = rank, world_size  # each process takes its part of every batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration produce epoch ``epoch``'s batches, from batch ``start_batch`` on."""
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def skipped(self) -> dict[str, str]:
        """Images that could not be read during the run: none, they were all decoded up front."""
        return {}

    def __len__(self) -> int:
        """Batches left in the epoch (all of them unless :meth:`set_epoch` started it later)."""
        n = len(self.images)
        return max(0, (n // self.batch_size if self.drop_last else -(-n // self.batch_size)) - self.start_batch)

    def plan(self, epoch: int) -> EpochPlan:
        """The order and augmentation of ``epoch``: a pure function of ``(seed, epoch)`` on this device."""
        n, device = len(self.images), self.device
        if not self.train:  # in order; cropping the padded copy at (pad, pad) leaves an image unchanged
            offsets = torch.full((n,), self.pad, device=device)
            no_flip = torch.zeros(n, dtype=torch.bool, device=device)
            return EpochPlan(torch.arange(n, device=device), offsets, offsets, no_flip)
        # The same (seed, epoch) -> seed mixing as excite.data.loader; torch generators take 64-bit seeds.
        seed = int(np.random.default_rng([self.seed, epoch]).integers(2**63))
        generator = torch.Generator(device).manual_seed(seed)
        order = torch.randperm(n, generator=generator, device=device)
        top, left = torch.randint(2 * self.pad + 1, (2, n), generator=generator, device=device)
        flip = torch.rand(n, generator=generator, device=device) < 0.5
        return EpochPlan(order, top, left, flip & self.flip)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        plan = self.plan(self.epoch)
        first = self.start_batch * self.batch_size
        for start in range(first, first + len(self) * self.batch_size, self.batch_size):
            part = slice(*shard(start, min(start + self.batch_size, len(self.images)), self.rank, self.world_size))
            if part.start == part.stop:  # this process's part of validation's last batch is empty
                continue
            index = plan.order[part]
            images = self.images[index]
            if self.train:
                images = crop_flip(images, plan.top[part], plan.left[part], plan.flip[part], self.pad)
            images = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), self.mean, self.std)
            yield images.to(self.dtype).contiguous(memory_format=self.memory_format), self.labels[index]


def tensor_cache(dataset, img_size: int) -> TensorCache:
    """The images of an excite :class:`ImageFileDataset` or a torchvision CIFAR set as a :class:`TensorCache`
    at ``img_size`` pixels square (decoded files are cached on disk under ``cache_dir()/tensors``)."""
    if isinstance(dataset, ImageFileDataset):
        paths, labels = zip(*dataset.samples)
        return TensorCache.from_files(paths, labels, size=img_size, cache_dir=cache_dir() / "tensors",
                                      max_pixels=dataset.max_pixels)
    if isinstance(getattr(dataset, "data", None), np.ndarray):  # torchvision's CIFAR: uint8 (N, H, W, C)
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
        if images.shape[-2:] != (img_size, img_size):
            images = TF.resize(images, [img_size, img_size], antialias=True)
        return TensorCache(images.contiguous(), torch.tensor(dataset.targets))
    raise DataError(f"cannot cache a {type(dataset).__name__} in memory: use an image folder or CIFAR")


def cached_loaders(bundle, batch_size: int, *, device: str | torch.device, hflip: bool = True,
                   channels_last: bool = False, seed: int = 0, rank: int = 0,
                   world_size: int = 1) -> tuple[CachedLoader, CachedLoader]:
    """Training and validation loaders over a :class:`~excite.data.DataBundle` held on ``device``.

    They apply the bundle's preset as its per-image transforms do (padded random crop for "cifar",
    flips unless ``hflip`` is off, the preset's normalisation), but to whole batches on the device, and
    keep or leave out the last training batch and share batches among processes as
    :func:`~excite.data.loader.make_loader` does.
    """
    if bundle.crop_pct is not None:
        raise DataError("the image cache resizes whole images and cannot crop them as --crop-pct asks: drop "
                        "--cache-images (or --crop-pct)")
    mean, std = normalization(bundle.preset, bundle.mean, bundle.std)
    common = dict(device=device, mean=mean, std=std, channels_last=channels_last, seed=seed, rank=rank,
                  world_size=world_size)
    images = tensor_cache(bundle.train, bundle.img_size)
    train = CachedLoader(images, batch_size, train=True, pad=CROP_PADDING[bundle.preset], flip=hflip,
                         drop_last=drops_last_batch(len(images), batch_size, world_size), **common)
    val = CachedLoader(tensor_cache(bundle.val, bundle.img_size), batch_size, train=False, **common)
    return train, val
