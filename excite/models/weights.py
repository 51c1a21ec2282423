"""Load weights into an excite model from a file or a state dict, in excite's, torchvision's or timm's layout.

excite's names follow torchvision (DenseNet, ResNet) and timm (DPN), so most state dicts load as they
are. The few layouts that differ are recognised from their keys and renamed; 1x1-convolution weights
and Linear weights are reshaped into each other. Files are read without running any code they hold:
``.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from excite.errors import CheckpointError
from excite.io import safe_torch_load

StateDict = Mapping[str, torch.Tensor]
WeightsSource = Union[str, os.PathLike, StateDict]

# How many key names an error message or summary line shows before "...".
_SHOW = 3

# (layout, test for one of its keys, renames to excite's names). Layouts not listed use excite's names.
_LAYOUTS: list[tuple[str, re.Pattern, list[tuple[str, str]]]] = [
    ("timm legacy SENet", re.compile(r"^layer0\.|\.se_module\."),
     [(r"^layer0\.", ""), (r"\.se_module\.", ".attn."), (r"^last_linear\.", "fc.")]),
    ("timm SE-ResNet", re.compile(r"\.se\."), [(r"\.se\.", ".attn.")]),
    # torchvision's released DenseNet files predate its current names: "denselayer1.norm.1" is "norm1".
    ("torchvision DenseNet (release file)", re.compile(r"denselayer\d+\.(norm|relu|conv)\.[12]\."),
     [(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.")]),
]

_LAYOUT_NOTES = {
    "timm legacy SENet": "legacy SENet strides in conv1 (not conv2) and pools with ceil_mode, so the model "
                         "computes a different function from the original: fine-tune before use",
}


@dataclass
class LoadReport:
    """What :func:`load_weights` did: which tensors came from the source and which did not.

    ``loaded``: model keys set from the source. ``skipped_classifier``: source classifier keys not loaded
    because the head has another shape (a different ``num_classes``). ``left_at_init``: attention modules
    the source had no weights for. ``missing`` / ``unexpected`` / ``mismatched``: any other model key the
    source lacked, source key the model lacks, or key whose shapes differ (these fail a strict load).
    """

    layout: str
    loaded: list[str] = field(default_factory=list)
    skipped_classifier: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def problems(self) -> str:
        """One line naming the missing, unexpected and mismatched keys; empty when there are none."""
        parts = [f"{len(keys)} {what} ({_few(keys)})" for what, keys in
                 (("missing", self.missing), ("unexpected", self.unexpected), ("with another shape", self.mismatched))
                 if keys]
        return ", ".join(parts)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors (source layout: {self.layout})"]
        if self.skipped_classifier:
            lines.append(f"classifier left at its initial values (the source head has another shape: "
                         f"{_few(self.skipped_classifier)})")
        if self.left_at_init:
            lines.append(f"{len(self.left_at_init)} attention layers left at their initial values: "
                         f"{_few(self.left_at_init)}")
        if self.problems:
            lines.append(f"not loaded: {self.problems}")
        lines += self.notes
        return "\n".join(lines)

    __str__ = summary


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file without running code from it: a state dict, or an excite checkpoint's ``"model"``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e})") from None
    obj = safe_torch_load(path)
    return _as_state_dict(obj, str(path))


def _as_state_dict(obj: object, origin: str) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself, or its ``"model"`` entry (an excite training checkpoint)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{origin} holds no state dict (expected a dict of tensors or a checkpoint with "
                              f"a 'model' entry)")
    return dict(obj)


def _to_excite_names(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Recognise the layout from the keys and rename its keys to excite's."""
    for layout, marker, renames in _LAYOUTS:
        if any(marker.search(k) for k in state):
            renamed = {}
            for key, value in state.items():
                for pattern, repl in renames:
                    key = re.sub(pattern, repl, key)
                renamed[key] = value
            return layout, renamed
    return "excite/torchvision/timm", state


def _reshaped(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``value`` reshaped to ``shape`` when the two differ only by trailing 1x1 dims (conv <-> Linear), else None."""
    a, b = tuple(value.shape), tuple(shape)
    short, long = sorted((a, b), key=len)
    if long[:len(short)] == short and all(d == 1 for d in long[len(short):]):
        return value.reshape(shape)
    return None


def _attn_module(key: str) -> str | None:
    """The attention module that owns ``key`` (excite names every attention submodule ``attn``), or None."""
    parts = key.split(".")
    return ".".join(parts[:parts.index("attn") + 1]) if "attn" in parts else None


def load_weights(model: nn.Module, source: WeightsSource, strict: bool = True) -> LoadReport:
    """Load ``source`` (a weights file path or a state dict) into ``model`` and report what was loaded.

    Accepted layouts: excite's (also a training checkpoint with the weights under ``"model"``),
    torchvision's DenseNet and ResNet, and timm's densenet*, seresnet*, legacy_seresnet* and dpn*.
    A classifier of another shape (a different ``num_classes``) stays at its initial values, and so do
    attention layers the source has no weights for (DenseNet weights into an SE-DenseNet); both are
    reported and warned about. With ``strict`` any other missing, unexpected or mismatched key raises
    :class:`CheckpointError`; without it, whatever fits is loaded.
    """
    if isinstance(source, Mapping):
        state = _as_state_dict(source, "the given dict")
    else:
        state = read_state_dict(source)
    layout, state = _to_excite_names(state)
    report = LoadReport(layout=layout, notes=[_LAYOUT_NOTES[layout]] if layout in _LAYOUT_NOTES else [])

    target = model.state_dict()
    head = getattr(model, "head_name", None)
    is_head = lambda key: head is not None and key.startswith(f"{head}.")  # noqa: E731
    loaded: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            (report.skipped_classifier if is_head(key) else report.unexpected).append(key)
            continue
        if value.shape != target[key].shape:
            value = _reshaped(value, target[key].shape)
            if value is None:
                if is_head(key):
                    report.skipped_classifier.append(key)
                else:
                    report.mismatched.append(f"{key} {tuple(state[key].shape)} vs {tuple(target[key].shape)}")
                continue
        loaded[key] = value

    for key in target:
        # BatchNorm's step counter is bookkeeping that older files lack; it never changes the output.
        if key in loaded or key.endswith("num_batches_tracked") or (is_head(key) and report.skipped_classifier):
            continue
        attn = _attn_module(key)
        if attn is None:
            report.missing.append(key)
        elif attn not in report.left_at_init:
            report.left_at_init.append(attn)
    report.loaded = list(loaded)

    name = getattr(model, "model_name", type(model).__name__)
    if strict and report.problems:
        raise CheckpointError(f"weights do not fit {name}: {report.problems}; check the model name and its "
                              f"options, or pass strict=False to load what fits")
    model.load_state_dict({**target, **loaded})
    for line in report.summary().splitlines()[1:]:
        warnings.warn(f"{name}: {line}", stacklevel=2)
    return report
