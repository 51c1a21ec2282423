"""Load weights into an excite model from a file or a state dict, in excite's, torchvision's or timm's layout.

excite's names follow torchvision (DenseNet, ResNet) and timm (DPN), so most state dicts load as they
are. The few layouts that differ are recognised from their keys and renamed; 1x1-convolution weights
and Linear weights are reshaped into each other. Files are read without running any code they hold:
``.safetensors`` through safetensors, anything else through ``torch.load(weights_only=True)``; the checksum
of a file excite wrote is verified.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch
from torch import nn

from excite.errors import CheckpointError
from excite.io import CHECKSUM, read_safetensors, safe_torch_load, verify_checksum

StateDict = Mapping[str, torch.Tensor]
WeightsSource = Union[str, os.PathLike, StateDict]

# How many key names an error message or summary line shows before "...".
_SHOW = 3
#: The layout of excite's own older files whose names have since changed (see :func:`current_names`).
OLD_EXCITE = "excite (before DenseNet's features ended in norm5)"

#: Layouts whose names differ from excite's only by fixed parts of a name, as (theirs, excite's); a leading "^"
#: means at the start of the name. Read by :func:`load_weights` one way, written by
#: :func:`excite.models.convert.convert_state_dict` the other.
NAME_PARTS: dict[str, list[tuple[str, str]]] = {
    "timm SE-ResNet": [(".se.", ".attn.")],
    # Before DenseNet's features ended in norm5 (as torchvision's do), SE on the final features was features.attn.
    OLD_EXCITE: [("^features.attn.", "^attn.")],
}


def name_renames(layout: str, reverse: bool = False) -> list[tuple[str, str]]:
    """``layout``'s :data:`NAME_PARTS` as ``re.sub`` (pattern, replacement) pairs: to excite's names, or from
    them with ``reverse``."""
    def pattern(part: str) -> str:
        return "^" + re.escape(part[1:]) if part.startswith("^") else re.escape(part)

    pairs = [(ours, theirs) if reverse else (theirs, ours) for theirs, ours in NAME_PARTS[layout]]
    return [(pattern(old), new.lstrip("^")) for old, new in pairs]


# (layout, test for one of its keys, renames to excite's names). Layouts not listed use excite's names.
_LAYOUTS: list[tuple[str, re.Pattern, list[tuple[str, str]]]] = [
    ("timm legacy SENet", re.compile(r"^layer0\.|\.se_module\."),
     [(r"^layer0\.", ""), (r"\.se_module\.", ".attn."), (r"^last_linear\.", "fc.")]),
    *((layout, re.compile("|".join(p for p, _ in name_renames(layout))), name_renames(layout))
      for layout in NAME_PARTS),
    # torchvision's released DenseNet files predate its current names: "denselayer1.norm.1" is "norm1".
    ("torchvision DenseNet (release file)", re.compile(r"denselayer\d+\.(norm|relu|conv)\.[12]\."),
     [(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.", r"\1\2.")]),
]

# (family, a test for one of its keys in excite's names, some of its models), to say which model a file is for.
_FAMILIES: list[tuple[str, re.Pattern, str]] = [
    ("a DenseNet", re.compile(r"^features\.denseblock\d"),
     "densenet121, densenet169, se_densenet121, resdense_j4, or densenet_bc_100 for small images"),
    ("a DPN", re.compile(r"^features\.conv1_1\."), "dpn68, dpn92"),
    ("a ResNet", re.compile(r"^layer1\.0\."), "resnet18, resnet50, se_resnet50, or resnet20_cifar for small images"),
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
    source lacked, source key the model lacks, or key whose shapes differ or whose values are integers
    (or booleans) where the model has floating point, or the reverse (these fail a strict load, and are
    never loaded).
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
                 (("missing", self.missing), ("unexpected", self.unexpected),
                  ("with another shape or type", self.mismatched))
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
    """Read a weights file without running code from it: a state dict, or an excite checkpoint's ``"model"``.

    A file excite wrote (a checkpoint, a ``.safetensors`` file with excite's metadata) that does not match the
    checksum stored in it raises :class:`CheckpointError`.
    """
    return _read_weights_file(Path(path))[0]


def _read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The state dict in ``path``, and the name of the model excite stored with it (None in other files)."""
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        try:
            model_name = json.loads(metadata.get("model_name", "null"))
        except json.JSONDecodeError:
            model_name = None
        return state, model_name if isinstance(model_name, str) else None
    obj = safe_torch_load(path)
    is_checkpoint = isinstance(obj, dict) and isinstance(obj.get("model"), Mapping)
    if is_checkpoint and CHECKSUM in obj:  # an excite checkpoint; older ones have no checksum
        verify_checksum({key: value for key, value in obj.items() if key != CHECKSUM}, obj[CHECKSUM], path)
    model_name = obj.get("model_name") if is_checkpoint else None
    return _as_state_dict(obj, str(path)), model_name if isinstance(model_name, str) else None


#: Prefixes that wrap a whole model's names: DataParallel/DDP (``module.``), torch.compile (``_orig_mod.``) and the
#: attribute a Lightning module usually keeps its network in. Removed only when every key carries the same one.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")


def _as_state_dict(obj: object, origin: str) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: ``obj`` itself, or its ``"model"`` entry (an excite training checkpoint) or
    ``"state_dict"`` entry (Lightning's ``.ckpt``, timm's ``model_best.pth.tar``), without wrapper prefixes."""
    if isinstance(obj, Mapping):
        entry = next((obj[key] for key in ("model", "state_dict") if isinstance(obj.get(key), Mapping)), None)
        obj = obj if entry is None else entry
    if not obj or not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{origin} holds no state dict (expected a dict of tensors, or a checkpoint with a "
                              "'model' or 'state_dict' entry)")
    state = dict(obj)
    while prefix := next((p for p in WRAPPER_PREFIXES if all(key.startswith(p) for key in state)), None):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _to_excite_names(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """Recognise the layout from the keys and rename its keys to excite's."""
    for layout, marker, renames in _LAYOUTS:
        if any(marker.search(k) for k in state):
            return layout, {_renamed(key, renames): value for key, value in state.items()}
    return "excite/torchvision/timm", state


def current_names(state: StateDict) -> dict[str, torch.Tensor]:
    """An excite state dict with the names of older excite versions renamed to today's (other names unchanged), so
    that checkpoints written before a rename still load and resume."""
    renames = name_renames(OLD_EXCITE)
    return {_renamed(key, renames): value for key, value in state.items()}


def _renamed(key: str, renames: list[tuple[str, str]]) -> str:
    for pattern, repl in renames:
        key = re.sub(pattern, repl, key)
    return key


def _reshaped(value: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """``value`` reshaped to ``shape`` when the two differ only by trailing 1x1 dims (conv <-> Linear), else None."""
    a, b = tuple(value.shape), tuple(shape)
    short, long = sorted((a, b), key=len)
    if long[:len(short)] == short and all(d == 1 for d in long[len(short):]):
        return value.reshape(shape)
    return None


def _kind(t: torch.Tensor) -> str:
    return "float" if t.is_floating_point() else "complex" if t.is_complex() else "integer"


def _family(keys: list[str]) -> tuple[str, str] | None:
    """The model family whose names ``keys`` (excite's names) use, and some of its models; None if unknown."""
    for family, marker, examples in _FAMILIES:
        if any(marker.search(k) for k in keys):
            return family, examples
    return None


def _which_model(file_model: str | None, keys: list[str], model_keys: list[str], name: str) -> str:
    """What to do when nothing in a file fits the model ``name``: the model the file is for, as far as it tells."""
    if file_model is not None and file_model != name:
        return f"it holds the weights of {file_model}: load it into that model (--model {file_model})"
    family, ours = _family(keys), _family(model_keys)
    if family is not None and family != ours:
        return f"its tensors are named as {family[0]}'s: load it into one of those models ({family[1]})"
    if family is not None or file_model is not None:
        return ("it is for this kind of model, but its tensors have other shapes or types: check the model's options "
                "(--model-arg) and that the weights are floating point, not quantized")
    return "check that it holds the weights of an excite, torchvision or timm image classifier"


def _attn_module(key: str) -> str | None:
    """The attention module that owns ``key`` (excite names every attention submodule ``attn``), or None."""
    parts = key.split(".")
    return ".".join(parts[:parts.index("attn") + 1]) if "attn" in parts else None


def check_fits(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise one CheckpointError line unless ``state`` has exactly ``model``'s tensors: the same names, shapes and
    kinds (floating point or not). What resuming and rebuilding a model from its own checkpoint need; weights from
    elsewhere, which may fit in part, go through :func:`load_weights`. ``what`` names the model in the message."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    # Integers in place of floats would be converted on loading, silently: weights cast to int8 predict nothing.
    retyped = [k for k in expected if k in state and state[k].is_floating_point() != expected[k].is_floating_point()]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (first {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (first {unexpected[0]})")
    if reshaped:
        k = reshaped[0]
        problems.append(f"{len(reshaped)} of another shape (first {k}: {tuple(state[k].shape)} in the file, "
                        f"{tuple(expected[k].shape)} in the model)")
    if retyped:
        k = retyped[0]
        problems.append(f"{len(retyped)} of another type (first {k}: {state[k].dtype} in the file, "
                        f"{expected[k].dtype} in the model)")
    if problems:
        raise CheckpointError(f"the weights do not fit {what}: tensors {'; '.join(problems)}")


def load_weights(model: nn.Module, source: WeightsSource, strict: bool = True) -> LoadReport:
    """Load ``source`` (a weights file path or a state dict) into ``model`` and report what was loaded.

    Accepted layouts: excite's (also a training checkpoint with the weights under ``"model"``),
    torchvision's DenseNet and ResNet, and timm's densenet*, seresnet*, legacy_seresnet* and dpn*.
    A classifier of another shape (a different ``num_classes``) stays at its initial values, and so do
    attention layers the source has no weights for (DenseNet weights into an SE-DenseNet); both are
    reported and warned about. With ``strict`` any other missing, unexpected or mismatched key raises
    :class:`CheckpointError`; without it, whatever fits is loaded. A source of which nothing fits outside the
    classifier raises :class:`CheckpointError` either way, saying which model it seems to be for: the model
    would otherwise train on from random weights as if it had been given some.
    """
    if isinstance(source, nn.Module):
        raise CheckpointError(f"got a {type(source).__name__} model where weights belong: pass its state_dict() "
                              "or a weights file")
    if isinstance(source, Mapping):
        state, file_model, origin = _as_state_dict(source, "the given dict"), None, "the given state dict"
    else:
        (state, file_model), origin = _read_weights_file(Path(source)), str(source)
    file_keys = list(state)
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
        if _kind(value) != _kind(target[key]):  # load_state_dict would convert int8 weights to floats silently
            report.mismatched.append(f"{key} {value.dtype} vs {target[key].dtype}")
            continue
        loaded[key] = value

    for key in target:
        # BatchNorm's step counter is bookkeeping that older files lack; it never changes the output. A key the
        # source has but that was not loaded is already listed as mismatched.
        if (key in loaded or key in state or key.endswith("num_batches_tracked")
                or (is_head(key) and report.skipped_classifier)):
            continue
        attn = _attn_module(key)
        if attn is None:
            report.missing.append(key)
        elif attn not in report.left_at_init:
            report.left_at_init.append(attn)
    report.loaded = list(loaded)

    name = getattr(model, "model_name", type(model).__name__)
    if not any(not is_head(k) and not k.endswith("num_batches_tracked") for k in loaded):
        raise CheckpointError(f"nothing in {origin} fits {name} outside its classifier "
                              f"({report.problems or 'no tensor to load'}; the file's layout: {layout}, its first "
                              f"keys: {_few(file_keys)}): {_which_model(file_model, list(state), list(target), name)}")
    if strict and report.problems:
        raise CheckpointError(f"weights do not fit {name}: {report.problems}; check the model name and its "
                              f"options, or pass strict=False to load what fits")
    model.load_state_dict({**target, **loaded})
    for line in report.summary().splitlines()[1:]:
        warnings.warn(f"{name}: {line}", stacklevel=2)
    return report
