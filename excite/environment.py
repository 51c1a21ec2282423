"""What produced a result: the device and the versions of the software, recorded beside runs and benchmarks."""
from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

from excite import __version__
from excite.errors import ExciteError
from excite.train.config import DEVICE_HELP, DEVICE_PATTERN


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo where there is one."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Versions of Python, torch, excite, and of torchvision and timm (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                    "excite": __version__}
    for package in ("torchvision", "timm"):
        spec = importlib.util.find_spec(package)
        found[package] = importlib.import_module(package).__version__ if spec is not None else None
    return found


def describe(device: torch.device) -> dict:
    """Device, versions, date and command line, as a run directory's ``environment.json`` records them."""
    return {"device": device_name(device), "versions": versions(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": sys.argv}


def select_device(name: str, allow_mps: bool = True) -> torch.device:
    """The device ``name`` asks for, checked to be usable here.

    ``name`` follows :data:`excite.train.config.DEVICE_PATTERN`, the one grammar of every ``--device``:
    ``auto`` (CUDA, then Apple's MPS unless ``allow_mps`` is off, then the CPU), ``cpu``, ``mps``, ``cuda``
    or ``cuda:N``. A caller that cannot use MPS (the benchmark) passes ``allow_mps=False``.
    """
    if not isinstance(name, str) or not DEVICE_PATTERN.fullmatch(name):
        raise ExciteError(f"--device {name!r} is not valid: choose {DEVICE_HELP}")
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok and allow_mps else "cpu")
    kind, _, index = name.partition(":")
    device = torch.device(kind, int(index)) if index else torch.device(kind)  # int(): "cuda:01" is cuda:1
    if device.type == "mps" and not allow_mps:
        raise ExciteError("--device mps is not supported by this command (CPU and CUDA only); use --device auto, "
                          "cpu or cuda")
    if device.type == "mps" and not mps_ok:
        raise ExciteError(f"--device {name} was asked for but MPS is not available; use --device auto or cpu")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ExciteError(f"--device {name} was asked for but no CUDA GPU is visible; use --device auto or cpu")
        if device.index is not None and device.index >= count:
            raise ExciteError(f"--device {name} was asked for but only {count} CUDA GPU(s) are visible "
                              f"(cuda:0 to cuda:{count - 1})")
    return device
