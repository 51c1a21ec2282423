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
    """The device ``name`` asks for ("auto", "cpu", "cuda", "cuda:1", "mps"), checked to be usable.

    ``auto`` picks CUDA, then Apple's MPS (unless ``allow_mps`` is off), then the CPU.
    """
    mps_ok = allow_mps and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    choices = "auto, cpu, cuda[:index]" + (", mps" if allow_mps else "")
    if device is None or device.type not in ("cpu", "cuda", "mps") or (device.type == "mps" and not allow_mps):
        raise ExciteError(f"--device {name!r} is not a device here: choose one of {choices}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ExciteError(f"--device {name} was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if device.type == "mps" and not mps_ok:
        raise ExciteError(f"--device {name} was asked for but MPS is not available; use --device auto or cpu")
    return device
