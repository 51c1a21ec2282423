"""Data-parallel training: which process this is, and the few things processes must agree on.

``torchrun --nproc-per-node N -m excite train ...`` starts N processes and tells each its place through the
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). :func:`processes`
reads that, joins the process group (NCCL between GPUs, gloo between CPUs) and leaves it at the end. Every
process builds the same model and draws the same data order; each trains on its part of every batch (see
:func:`excite.data.loader.shard`) and DistributedDataParallel averages the gradients. Process 0 alone writes
the run directory and prints. Without torchrun there is one process and nothing here does anything.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from excite.errors import ExciteError


class ReportedByMainProcess(ExciteError):
    """An error process 0 met and reports; the other processes stop with it without printing it again."""

    quiet = True


@dataclass(frozen=True)
class Processes:
    """This process's place among those training one run: ``rank`` of ``world_size``, ``local_rank`` on its
    machine (which GPU it drives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory and prints (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def device(self, device: torch.device) -> torch.device:
        """The device this process trains on: on CUDA the GPU of its local rank, one GPU per process."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            raise ExciteError(f"--device {device} names one GPU, but under torchrun each process takes the GPU of its "
                              "local rank: use --device cuda (or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
        if self.local_rank >= torch.cuda.device_count():
            raise ExciteError(f"process {self.rank} needs GPU {self.local_rank} but only {torch.cuda.device_count()} "
                              "are visible: start at most that many processes per machine (--nproc-per-node)")
        return torch.device("cuda", self.local_rank)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (a new tensor; ``tensor`` itself when there is one process)."""
        if not self.distributed:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    def any(self, flags: list[bool], device: torch.device) -> list[bool]:
        """For each of ``flags``, whether it is true in any process: how processes agree to checkpoint or stop at
        the same step."""
        if not self.distributed:
            return flags
        return [bool(n) for n in self.sum(torch.tensor([int(f) for f in flags], device=device)).tolist()]

    def share(self, value: Any) -> Any:
        """Process 0's ``value``, in every process (pickled: only for values excite itself made)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def merge(self, entries: dict) -> dict:
        """The union of every process's ``entries`` (e.g. the images each one found unreadable)."""
        if not self.distributed:
            return entries
        parts: list[dict] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(parts, entries)
        return {key: value for part in parts for key, value in part.items()}

    def copy_buffers_from_main(self, model: nn.Module) -> None:
        """Give every process process 0's buffers (BatchNorm's running statistics). Without SyncBatchNorm each
        process's statistics follow its own images; validating with process 0's, which are the ones saved, makes
        the validation the same as ``excite eval`` of the saved weights."""
        if self.distributed:
            for buffer in model.buffers():
                dist.broadcast(buffer.data, src=0)


def from_environment() -> Processes:
    """The place torchrun gave this process (one process of one when not started by torchrun)."""
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ExciteError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers: start excite through torchrun, "
                          "which sets them") from None
    if not 0 <= rank < world_size:
        raise ExciteError(f"RANK {rank} is not a process of WORLD_SIZE {world_size}: start excite through torchrun")
    return Processes(rank, world_size, local_rank)


@contextmanager
def processes(device: torch.device) -> Iterator[Processes]:
    """This process's :class:`Processes`, within a joined process group when torchrun started several.

    A process group someone else started (a script that calls :func:`excite.fit` under its own DDP setup) is
    used as it is and left running; one started here is ended here.
    """
    if dist.is_available() and dist.is_initialized():
        yield Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
        return
    place = from_environment()
    if not place.distributed:
        yield place
        return
    if device.type == "cuda":
        torch.cuda.set_device(place.device(device))
    # NCCL only runs between GPUs; gloo runs everywhere else (and is what the tests use on the CPU).
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield place
        dist.barrier()  # no process leaves while another still has a collective in flight
    finally:
        dist.destroy_process_group()


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose batch statistics are those of all processes' images together, for CPU processes.

    torch's SyncBatchNorm runs on GPUs only; this computes the same thing with two all-reduces that autograd
    differentiates through (``torch.distributed.nn.functional.all_reduce``), so a step of N processes equals a
    step of one process on their batches concatenated. On GPUs excite uses torch's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # imported late: it pulls in the RPC machinery

        channels = x.shape[1]
        local = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                           x.new_full((1,), x.numel() // channels)])
        total = all_reduce(local)
        count = total[-1]
        mean = total[:channels] / count
        var = total[channels:2 * channels] / count - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(unbiased, momentum)
        shape = (1, channels, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` with its BatchNorm layers computing statistics over all processes: torch's SyncBatchNorm on
    GPUs, :class:`GlooSyncBatchNorm` on the CPU. Parameters and buffers are kept, so are state-dict names."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias  # the same parameters, not copies
            synced.to(child.weight.device if child.affine else device)
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model


def for_training(model: nn.Module, place: Processes, device: torch.device, sync_bn: bool,
                 freezes: bool = False) -> nn.Module:
    """What the training step calls: ``model`` itself in one process; under several, ``model`` wrapped in
    DistributedDataParallel, which averages the gradients of all processes in the backward pass. ``freezes``: the
    session will train epochs with a frozen backbone, which DDP cannot follow."""
    if not place.distributed:
        return model
    if freezes:
        # DDP fixes the parameters it averages when it wraps the model; --freeze changes them during the run.
        raise ExciteError("--freeze does not work under torchrun yet: train the frozen epochs in one process, then "
                          "resume the run under torchrun (--nproc N)")
    if sync_bn:
        sync_batchnorm(model, device)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

