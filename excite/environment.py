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
