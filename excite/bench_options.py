"""The ``excite bench`` options, apart from :mod:`excite.bench` so that the CLI builds its parser without
importing torch (``excite --help`` starts at once)."""
from __future__ import annotations

import argparse
from pathlib import Path

from excite.train.config import DEVICE_HELP

MODES = ("train", "infer")
COMPILE_CHOICES = ("none", "excite", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``excite bench`` options, for the CLI to mount on its sub-command."""
    parser.add_argument("models", nargs="+", help="registered model names, e.g. densenet121 se_resnet50")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", choices=COMPILE_CHOICES, default="none",
                        help="also measure the excite model (excite) or every candidate (all) under torch.compile")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_HELP}; the benchmark measures CPU and CUDA")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="skip torchvision / timm")
    parser.add_argument("--no-fast", dest="fast", action="store_false",
                        help="skip excite-fast (buffer dense block, folded BatchNorm)")
    parser.add_argument("--json", type=Path, help="write the results (a list, one per model) here")
    parser.add_argument("--markdown", type=Path, help="write the report here")
