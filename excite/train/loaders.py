"""Where a run's batches come from: files through a DataLoader, or the whole set decoded once into an image cache
on the training device (:mod:`excite.data.gpu_cache`). Either way a batch is a pure function of (seed, epoch),
and under several processes each loads its own part of every batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from excite.data import DataBundle, make_loader
from excite.data.gpu_cache import cached_loaders
from excite.data.loader import default_workers
from excite.errors import ExciteError
from excite.train.config import TrainConfig
from excite.train.distributed import Processes

# The largest uint8 image set (in bytes) that --cache-images is on for by default: CIFAR-10 at 32 px takes
# 150 MiB; a limit 13x that still fits beside training in a laptop's or a small GPU's memory.
IMAGE_CACHE_LIMIT = 2 * 2**30


@dataclass
class Loaders:
    """A run's training and validation loaders, and how they make batches."""

    train: object
    val: object
    cached: bool  # batches made on the device from the image cache
    workers: int  # loader processes (per training process) when not cached

    def source(self, device: torch.device) -> str:
        """How batches are made, for the run's header."""
        return f"batches made on {device} from the image cache" if self.cached else f"{self.workers or 'no'} loader " \
                                                                                    "workers"

    def skipped(self) -> dict[str, str]:
        """Images that could not be read so far in this session (path -> reason); the lists only grow."""
        return {**self.train.skipped, **self.val.skipped}


def use_image_cache(config: TrainConfig, data: DataBundle) -> bool:
    """Whether batches come from the on-device image cache instead of a DataLoader."""
    if config.cache_images and config.augment:
        raise ExciteError(f"--augment {config.augment} works per image and cannot run on the image cache: drop one "
                          "of --augment and --cache-images")
    if config.cache_images is not None:
        return config.cache_images
    # For small images the per-image pipeline costs about as much as the model (on 2 CPU cores ResNet-20
    # trains on CIFAR-10 at 525 img/s from JPEG files, 753 img/s from the cache: bench/run_cache_cpu.sh);
    # sets this small fit in memory on any device. The cache resizes whole images: a --crop-pct needs the files.
    size = (len(data.train) + len(data.val)) * 3 * data.img_size ** 2
    return data.preset == "cifar" and config.augment is None and config.crop_pct is None and size <= IMAGE_CACHE_LIMIT


def build_loaders(config: TrainConfig, data: DataBundle, device: torch.device,
                  place: Processes = Processes()) -> Loaders:
    """The loaders of a run on ``data``; ``data.batch_size`` is the batch of all processes together."""
    if place.distributed and data.batch_size < 2 * place.world_size:
        raise ExciteError(f"--batch-size is the batch of all {place.world_size} processes together, and batch norm "
                          f"needs two images or more in each: use --batch-size {2 * place.world_size} or more")
    shared = dict(seed=config.seed, rank=place.rank, world_size=place.world_size)
    cached = use_image_cache(config, data)
    if cached:
        train, val = cached_loaders(data, data.batch_size, device=device, hflip=config.hflip,
                                    channels_last=config.channels_last, **shared)
        return Loaders(train, val, cached=True, workers=0)
    workers = config.workers if config.workers >= 0 else default_workers(device)
    train = make_loader(data.train, data.batch_size, train=True, workers=workers, **shared)
    val = make_loader(data.val, data.batch_size, train=False, workers=workers, **shared)
    return Loaders(train, val, cached=False, workers=workers)
