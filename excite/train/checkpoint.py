"""Checkpoints that resume a run exactly, and weights-only ``.safetensors`` files to share.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, None, lists, tuples
and dicts, so it loads with ``torch.load(weights_only=True)`` and nothing stored in it can run. The
trainer saves this layout (``save_checkpoint`` adds ``format`` and ``version``)::

    {
        "format": "excite-checkpoint", "version": 1,
        "model_name": str, "model_kwargs": dict,   # create_model(model_name, **model_kwargs) rebuilds it
        "classes": list[str],                      # class index -> name
        "img_size": int, "preset": str,            # the input size and transform preset it was trained with
        "config": dict,                            # the run's config as a plain dict
        "epoch": int,                              # the last completed epoch
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": dict | None,                     # the GradScaler's state_dict (float16 training only)
        "rng": capture_rng_state(),
        "metrics": list[dict],                     # the metrics history, one row per epoch
        "best_acc": float, "best_epoch": int,      # the best validation accuracy so far and its epoch
        "partial": dict | None,                    # where inside the next epoch a mid-epoch checkpoint stopped
        "checksum": str,                           # excite.io.checksum of everything else, added on saving
    }

A run directory holds ``last.pt`` (written after every epoch) and ``best.pt`` (the epoch with the
best validation accuracy). A weights file (``.safetensors``) keeps only ``model`` and puts the
entries of ``WEIGHTS_METADATA`` and a ``checksum`` of the tensors and metadata in its metadata as JSON, so it
rebuilds the model on its own. Loading verifies the checksum (files without one, from older excite versions,
load unchecked) and :func:`validate_checkpoint` checks every entry that rebuilding the model, eval, predict and
resuming read.
"""
from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import safetensors.torch
import torch
from torch import nn

from excite.data.transforms import PRESETS
from excite.errors import CheckpointError, UnknownModelError
from excite.io import (
    CHECKSUM,
    atomic_write,
    checksum,
    read_safetensors,
    safe_torch_load,
    safetensors_checksum,
    verify_checksum,
)
from excite.models import create_model
from excite.models.weights import check_fits, current_names

FORMAT = "excite-checkpoint"
VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
# What a weights file needs besides the tensors to rebuild the model and prepare its inputs.
WEIGHTS_METADATA = ("model_name", "model_kwargs", "classes", "img_size", "preset", "config", "epoch")

# Exact types, not subclasses: numpy.float64 is a float but pickles as a numpy global that
# weights_only refuses, and a namedtuple is a tuple that pickles as its class.
_PLAIN_LEAVES = (bool, int, float, str, type(None))
_PLAIN_MAPPINGS = (dict, OrderedDict)
_PLAIN_SEQUENCES = (list, tuple)


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator a run draws from: torch (CPU and each CUDA device), numpy
    and python's ``random``, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # numpy's key is an ndarray, which weights_only refuses; a tensor of the same numbers is allowed.
        "numpy": {**np_state, "state": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                                        "pos": np_state["state"]["pos"]}},
        # Nested tuples of ints (and None or a float): allowed as they are.
        "python": random.getstate(),
    }


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back generator states from :func:`capture_rng_state`.

    CUDA states are restored for the devices present; a GPU run resumed on CPU goes on without them.
    """
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), device)
    np_state = state["numpy"]
    key = np_state["state"]["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state({**np_state, "state": {"key": key, "pos": np_state["state"]["pos"]}})
    random.setstate(state["python"])


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Write ``state`` (the layout in the module docstring) to ``path`` atomically, adding
    ``format``, ``version`` and ``checksum``.

    Raises ``TypeError`` naming the first value that could not be loaded back with weights_only
    (convert a config dataclass with ``dataclasses.asdict`` first), and
    :class:`~excite.errors.WriteRefused` when the system refuses the write.
    """
    state = {**{key: value for key, value in state.items() if key != CHECKSUM}, "format": FORMAT, "version": VERSION}
    _check_plain(state, "state")
    state[CHECKSUM] = checksum(state)
    with atomic_write(path) as f:
        torch.save(state, f)


def _check_plain(obj: Any, where: str) -> None:
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES:
        return
    if type(obj) in _PLAIN_MAPPINGS:
        for key, value in obj.items():
            _check_plain(key, f"{where} key {key!r}")
            _check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in _PLAIN_SEQUENCES:
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__qualname__}; only tensors, "
                        "numbers, strings, None, lists, tuples and dicts can be saved")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without running anything stored in it.

    ``path`` is a ``.pt`` file written by :func:`save_checkpoint`, a run directory (its ``last.pt``
    is loaded) or a ``.safetensors`` weights file (see :func:`read_weights`). A missing, truncated,
    foreign, unsafe or damaged file (its checksum does not match), or one that lacks an entry of the
    layout (:func:`validate_checkpoint`), raises :class:`~excite.errors.CheckpointError`. The returned
    dict has no ``checksum``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if path.suffix == ".safetensors":
        return read_weights(path, device=str(map_location))
    ckpt = safe_torch_load(path, map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is a PyTorch file but not an excite checkpoint: pass a last.pt or best.pt "
                              "written by `excite train`")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path} is checkpoint version {ckpt.get('version')!r}, this excite reads version "
                              f"{VERSION}: use the excite version that wrote it")
    if CHECKSUM in ckpt:  # older excite versions wrote none
        stored = ckpt.pop(CHECKSUM)
        verify_checksum(ckpt, stored, path)
    return validate_checkpoint(ckpt, path)


def _is_int(value: Any) -> bool:
    return type(value) is int  # not bool, which isinstance counts as an int


def _is_metrics(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(row, dict) and _is_int(row.get("epoch")) for row in value)


def _is_partial(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and _is_int(value.get("epoch"))
                             and isinstance(value.get("progress"), dict) and _is_int(value["progress"].get("step"))
                             and isinstance(value.get("rng"), dict))


# (key, test, what it must be) for each entry that rebuilding the model and preparing its inputs read...
_WEIGHTS_FIELDS = (
    ("model_name", lambda v: isinstance(v, str) and v != "", "a model name"),
    ("model_kwargs", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
     "a dict of builder arguments"),
    ("classes", lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(c, str) for c in v),
     "a list of class names"),
    ("img_size", lambda v: _is_int(v) and v >= 8, "an image size of at least 8"),
    ("preset", lambda v: isinstance(v, str) and v in PRESETS, f"one of {', '.join(PRESETS)}"),
    ("model", lambda v: isinstance(v, dict) and len(v) > 0
     and all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()), "a state dict of tensors"),
)
_CONFIG = ("config", lambda v: isinstance(v, dict), "a dict of the run's options")
_EPOCH = ("epoch", lambda v: _is_int(v) and v >= 0, "an epoch number")
# ...that resuming reads besides, from a training checkpoint...
_TRAINING_FIELDS = (
    _CONFIG,
    _EPOCH,
    ("metrics", _is_metrics, "a list of one row (a dict with an epoch number) per epoch"),
    ("best_acc", lambda v: type(v) in (int, float), "a number"),
    ("best_epoch", lambda v: _is_int(v) and v >= 0, "an epoch number"),
    ("optimizer", lambda v: isinstance(v, dict), "an optimizer state dict"),
    ("scheduler", lambda v: isinstance(v, dict), "a scheduler state dict"),
)
# ...and that are checked where present (older files lack them).
_OPTIONAL_FIELDS = (
    _CONFIG,
    _EPOCH,
    ("scaler", lambda v: v is None or isinstance(v, dict), "None or a GradScaler state dict"),
    ("partial", _is_partial, "None or where in an epoch the checkpoint stopped"),
)


def validate_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """Check that ``ckpt`` has each entry, of the right type, that rebuilding the model, eval and predict read,
    and for a training checkpoint (``format`` set) those that resuming reads; return ``ckpt``.

    The first problem raises one :class:`~excite.errors.CheckpointError` line naming ``path``, instead of a
    traceback wherever the value would first be used. Whether the weights fit the model is checked when it is
    built (:func:`model_from_checkpoint`, :func:`restore_state`).
    """
    required = _WEIGHTS_FIELDS + (_TRAINING_FIELDS if ckpt.get("format") == FORMAT else ())
    optional = tuple(field for field in _OPTIONAL_FIELDS if field[0] in ckpt and field not in required)
    for key, is_valid, expected in required + optional:
        if key not in ckpt:
            raise CheckpointError(f"{path} has no {key!r} entry ({expected}): it was written by another excite "
                                  "version or edited; use the run's other checkpoint or retrain")
        if not is_valid(ckpt[key]):
            raise CheckpointError(f"{path} is not a usable checkpoint: its {key!r} is {_describe(ckpt[key])}, "
                                  f"where excite expects {expected}; use the run's other checkpoint or retrain")
    return ckpt


def _describe(value: Any) -> str:
    shown = repr(value)
    return f"{shown if len(shown) <= 40 else shown[:37] + '...'} ({type(value).__name__})"


def _first_sentence(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else type(error).__name__


def export_safetensors(model_state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                       metadata: Mapping[str, Any] | None = None) -> None:
    """Write tensors to a ``.safetensors`` file atomically, with ``metadata`` values stored as JSON and a
    ``checksum`` of both added to the metadata (see :func:`excite.io.safetensors_checksum`).

    Every tensor is copied to its own contiguous CPU memory first: safetensors refuses tensors that
    share storage (tied weights) or are non-contiguous views.
    """
    tensors = {name: t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
               for name, t in model_state.items()}
    encoded = {key: json.dumps(value) for key, value in (metadata or {}).items() if key != CHECKSUM}
    encoded[CHECKSUM] = json.dumps(safetensors_checksum(tensors, encoded))
    data = safetensors.torch.save(tensors, metadata=encoded)
    with atomic_write(path) as f:
        f.write(data)


def save_weights(path: str | os.PathLike, ckpt: Mapping[str, Any]) -> None:
    """Write a checkpoint's model weights to a ``.safetensors`` file that rebuilds the model on its own.

    ``ckpt`` needs ``model`` (the state dict), ``model_name``, ``model_kwargs``, ``classes``, ``img_size``
    and ``preset``; those and the other entries of ``WEIGHTS_METADATA`` it has go into the file's metadata.
    """
    missing = [key for key, _, _ in _WEIGHTS_FIELDS if key not in ckpt]
    if missing:
        raise KeyError(f"save_weights needs the checkpoint's {', '.join(missing)}")
    export_safetensors(ckpt["model"], path, {key: ckpt[key] for key in WEIGHTS_METADATA if key in ckpt})


def read_weights(path: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Read a weights file from :func:`save_weights` as a dict of its metadata plus ``"model"`` (the state
    dict), which :func:`model_from_checkpoint` accepts.

    Its checksum is verified (:func:`~excite.io.verify_safetensors_checksum`) and its entries checked
    (:func:`validate_checkpoint`). JSON turns tuples in ``model_kwargs`` into lists; the models take either.
    """
    state, metadata = read_safetensors(path, device)
    try:
        weights = {key: json.loads(value) for key, value in metadata.items() if key != CHECKSUM}
    except json.JSONDecodeError:
        weights = {}
    if "model_name" not in weights:
        raise CheckpointError(f"{path} has no excite metadata (model_name), so the model cannot be rebuilt from it: "
                              "pass a weights file written by excite")
    return validate_checkpoint({**weights, "model": state}, path)


def model_from_checkpoint(ckpt: Mapping[str, Any], origin: str | os.PathLike = "the checkpoint"
                          ) -> tuple[nn.Module, list[str]]:
    """Rebuild the model a checkpoint (or :func:`read_weights` result) describes, with its weights
    loaded and in eval mode, and return it with the class names.

    ``origin`` (the file) names the checkpoint in errors: a model that cannot be built, weights that do not
    fit it, or a list of classes that does not have one name per output of the model.
    """
    name, kwargs = ckpt["model_name"], ckpt["model_kwargs"]
    try:
        model = create_model(name, **kwargs)
    except UnknownModelError as e:
        raise CheckpointError(f"the checkpoint's model is not available here: {e}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot build {name} with the checkpoint's arguments {kwargs} ({e}): was it "
                              "written by another excite version?") from None
    state = current_names(ckpt["model"])
    check_fits(model, state, f"{name} built with {kwargs}")
    model.load_state_dict(state)
    outputs = getattr(model, "num_classes", None)
    if outputs is not None and len(ckpt["classes"]) != outputs:
        raise CheckpointError(f"{origin} names {len(ckpt['classes'])} classes but its model has {outputs} outputs: "
                              "the file was edited or damaged; use the run's other checkpoint or retrain")
    return model.eval(), list(ckpt["classes"])


def restore_state(obj: Any, state: Any, what: str, path: str | os.PathLike) -> None:
    """``obj.load_state_dict(state)`` for resuming from the checkpoint ``path``: a state that does not fit
    (``what`` names it, e.g. "optimizer") raises one CheckpointError line instead of torch's traceback.

    A model's state is checked first, key by key and shape by shape, as in :func:`model_from_checkpoint`.
    """
    if isinstance(obj, nn.Module):
        state = current_names(state)
        check_fits(obj, state, f"{getattr(obj, 'model_name', type(obj).__name__)} as this run builds it "
                                f"(resuming from {path})")
    try:
        obj.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"the {what} state in {path} does not fit this run ({_first_sentence(e)}): use the "
                              "run's other checkpoint, or start a new run") from None
