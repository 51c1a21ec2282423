"""Data loaders whose batches, augmentation included, are a pure function of (seed, epoch).

The sampler draws the epoch's order and one seed per sample from ``(seed, epoch)``; each sample is loaded
with the torch random generator seeded by its own seed (see :class:`_SeededLoad`). So a run resumed at epoch
``e`` sees exactly the batches an uninterrupted run saw, whatever the number of workers. Images that fail to
decode during the run are dropped from their batch and listed in :attr:`Loader.skipped`.

Under data-parallel training every process draws the same order and takes its own contiguous part of each
batch (:func:`shard`), so ``batch_size`` is the batch of all processes together and the images each step
trains on do not depend on how many processes share it.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from excite.data.images import UnreadableImage


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(index, sample seed)`` pairs: shuffled (when ``shuffle``) and seeded from ``(seed, epoch)``."""

    def __init__(self, size: int, *, shuffle: bool, seed: int) -> None:
        self.size, self.shuffle, self.seed, self.epoch, self.start = size, shuffle, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Choose the epoch whose order and augmentation the next iteration produces, from its
        ``start``-th sample on (a run resumed in the middle of an epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, self.size - self.start)  # 0 when a resumed epoch already went past a shrunken set

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        sample_seeds = rng.integers(2**63, size=self.size)  # torch generators take 64-bit seeds
        return zip(order[self.start:].tolist(), sample_seeds[self.start:].tolist())


def shard(start: int, stop: int, rank: int, world_size: int) -> tuple[int, int]:
    """The part ``[begin, end)`` of the batch ``[start, stop)`` that process ``rank`` of ``world_size`` takes:
    contiguous parts in rank order whose sizes differ by at most one (the first ranks take the extra images)."""
    size, extra = divmod(stop - start, world_size)
    begin = start + rank * size + min(rank, extra)
    return begin, begin + size + (rank < extra)


class _ShardedBatches(Sampler[list]):
    """The batches of ``sampler`` in groups of ``batch_size``, each cut down to process ``rank``'s part."""

    def __init__(self, sampler: EpochSampler, batch_size: int, *, drop_last: bool, rank: int,
                 world_size: int) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list]:
        keys = list(self.sampler)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            begin, end = shard(start, min(start + self.batch_size, len(keys)), self.rank, self.world_size)
            yield keys[begin:end]  # empty for some ranks only in validation's last batch


class _Skipped(NamedTuple):
    path: str
    reason: str


class _SeededLoad(Dataset):
    """Loads ``dataset[index]`` for a key ``(index, seed)`` with torch's generator seeded by ``seed``, restoring
    the generator afterwards; an unreadable image comes back as a :class:`_Skipped` marker."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]) -> tuple | _Skipped:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # torch.manual_seed would also reseed CUDA's generators
            try:
                return self.dataset[index]
            except UnreadableImage as error:
                return _Skipped(error.path, error.reason)


def _collate(batch: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[_Skipped]]:
    kept = [sample for sample in batch if not isinstance(sample, _Skipped)]
    skipped = [sample for sample in batch if isinstance(sample, _Skipped)]
    images, labels = default_collate(kept) if kept else (None, None)
    return images, labels, skipped


class Loader:
    """Iterates ``(images, labels)`` batches of a :class:`DataLoader` made by :func:`make_loader`.

    Call :meth:`set_epoch` before each epoch. :attr:`skipped` maps each image that could not be read during
    the run to the reason.
    """

    def __init__(self, loader: DataLoader, sampler: EpochSampler, batch_size: int) -> None:
        self.dataset = loader.dataset.dataset
        self.sampler, self.batch_size = sampler, batch_size
        self.skipped: dict[str, str] = {}
        self._loader = loader

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration produce epoch ``epoch``'s batches, from batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def skipped_count(self) -> int:
        """How many distinct images could not be read so far."""
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self._loader:
            self.skipped.update(skipped)
            if images is not None:
                yield images, labels


def default_workers(device: torch.device) -> int:
    """Loader processes when none are asked for: up to 4 feeding a GPU, none on the CPU, where starting
    workers costs more than it saves and every core already runs the model."""
    return min(4, torch.multiprocessing.cpu_count()) if device.type == "cuda" else 0


def drops_last_batch(size: int, batch_size: int, world_size: int = 1) -> bool:
    """Whether training on ``size`` images in batches of ``batch_size`` leaves out each epoch's last batch: only
    when it would give a process a single image, which batch norm cannot train on (one process: a last batch of
    one image; ``world_size`` processes: a last batch of fewer than two images each)."""
    last = size % batch_size
    return batch_size > 1 and 0 < last < 2 * world_size


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, workers: int = 0, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> Loader:
    """A :class:`Loader` over ``dataset``: shuffled when ``train`` (validation never shuffles).

    Every image is in every epoch, the last batch being smaller when ``batch_size`` does not divide the set,
    except that training leaves out a last batch too small to share (see :func:`drops_last_batch`). With
    ``world_size`` processes, ``batch_size`` is their batch together and process ``rank`` loads its part of it.
    """
    sampler = EpochSampler(len(dataset), shuffle=train, seed=seed)
    batches = _ShardedBatches(sampler, batch_size, rank=rank, world_size=world_size,
                              drop_last=train and drops_last_batch(len(dataset), batch_size, world_size))
    loader = DataLoader(
        _SeededLoad(dataset), batch_sampler=batches, num_workers=workers, collate_fn=_collate,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed))  # else DataLoader draws worker seeds from the global one
    return Loader(loader, sampler, batch_size)
