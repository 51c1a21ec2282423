"""Write an excite model's weights in the layout of the same model in torchvision or timm (``excite convert``).

Only models that compute exactly the peer's function convert: the table below lists them, and the converted
state dict must have every name and shape of the peer built with the same ``num_classes``, or nothing is
written. The renames are :data:`excite.models.weights.NAME_PARTS` read backwards (what :func:`load_weights`
reads), and 1x1-convolution and Linear weights are reshaped to the peer's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from excite.errors import ExciteError
from excite.models.weights import _few, _renamed, _reshaped, name_renames

LIBRARIES = ("torchvision", "timm")

#: excite model -> {library: the peer's model name}. Checked by tests/test_convert.py, output against output.
PEERS: dict[str, dict[str, str]] = {
    **{f"resnet{d}": {"torchvision": f"resnet{d}", "timm": f"resnet{d}"} for d in (18, 34, 50, 101, 152)},
    **{f"se_resnet{d}": {"timm": f"seresnet{d}"} for d in (18, 34, 50, 101, 152)},
    **{f"densenet{d}": {"torchvision": f"densenet{d}", "timm": f"densenet{d}"} for d in (121, 161, 169, 201)},
    **{f"dpn{d}": {"timm": f"dpn{d}"} for d in (68, 92)},
}

#: The NAME_PARTS layout each library's names differ by, per excite model family (the rest are excite's names).
_PEER_LAYOUT = {("timm", "se_resnet"): "timm SE-ResNet"}

SUFFIXES = (".safetensors", ".pth", ".pt")


def _convertible(to: str) -> str:
    """The models that convert to ``to``, by family: "resnet18/34/50/101/152, densenet121/161/169/201"."""
    families: dict[str, list[str]] = {}
    for name, peers in PEERS.items():
        if to in peers:
            family, depth = re.fullmatch(r"(.*?)(\d+)", name).groups()
            families.setdefault(family, []).append(depth)
    return ", ".join(family + "/".join(depths) for family, depths in families.items())


def peer_name(model_name: str, to: str) -> str:
    """The name of ``model_name``'s counterpart in ``to`` ("torchvision" or "timm"); an :class:`ExciteError` naming
    the models that convert when there is none."""
    _check_library(to)
    peers = PEERS.get(model_name, {})
    if to in peers:
        return peers[to]
    other = next(iter(peers), None)
    hint = f"; use --to {other} ({peers[other]})" if other else (
        f"; the models that convert: to torchvision {_convertible('torchvision')}; to timm {_convertible('timm')}")
    raise ExciteError(f"{model_name} has no counterpart in {to} with the same architecture, so its weights cannot be "
                      f"written in {to}'s layout{hint}")


def _check_library(to: str) -> None:
    if to not in LIBRARIES:
        raise ExciteError(f"cannot convert to {to!r}: choose {' or '.join(LIBRARIES)}")


def build_peer(to: str, name: str, num_classes: int, device: str | torch.device | None = None) -> nn.Module:
    """The peer model ``name`` of library ``to`` with random weights (nothing is downloaded)."""
    with torch.device(device or "cpu"):
        if to == "timm":
            try:
                import timm
            except ImportError:
                raise ExciteError("converting to timm's layout needs timm: pip install timm") from None
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
        import torchvision

        return getattr(torchvision.models, name)(weights=None, num_classes=num_classes)


def convert_state_dict(model: nn.Module, to: str) -> tuple[str, dict[str, torch.Tensor]]:
    """``model``'s weights (an excite model from :func:`~excite.models.create_model`) named and shaped as those of
    its counterpart in ``to`` ("torchvision" or "timm"): ``(the peer's model name, state dict)``, which the peer
    built with the same ``num_classes`` loads with ``strict=True``.

    An :class:`ExciteError` when the model has no counterpart, or was built with options that change its
    architecture (``widths``, ``attn_layer``, ``in_chans``...): the peer computes another function then.
    """
    name = getattr(model, "model_name", None)
    if name is None:
        raise ExciteError(f"cannot tell which model this {type(model).__name__} is: build it with create_model")
    peer = peer_name(name, to)
    layout = _PEER_LAYOUT.get((to, re.sub(r"\d+$", "", name)))
    renames = name_renames(layout, reverse=True) if layout else []
    # The peer on the meta device: its names and shapes, without memory or arithmetic.
    target = build_peer(to, peer, model.num_classes, "meta").state_dict()
    state, problems = {}, {"missing": [], "unexpected": [], "with another shape": []}
    for key, value in model.state_dict().items():
        key = _renamed(key, renames)
        if key not in target:
            problems["unexpected"].append(key)
            continue
        if value.shape != target[key].shape and (value := _reshaped(value, target[key].shape)) is None:
            problems["with another shape"].append(key)
            continue
        state[key] = value.detach()
    problems["missing"] = [key for key in target if key not in state and key not in problems["with another shape"]]
    if any(problems.values()):
        found = ", ".join(f"{len(keys)} {what} ({_few(keys)})" for what, keys in problems.items() if keys)
        kwargs = getattr(model, "model_kwargs", {})
        raise ExciteError(f"{name} built with {kwargs} is not {to}'s {peer}, whose tensors it lacks or does not fit: "
                          f"{found}; only the model's own architecture converts (options that change no weight, "
                          "such as num_classes, drop_rate or impl, may differ)")
    return peer, state


def how_to_load(to: str, peer: str, path: str | os.PathLike, num_classes: int) -> str:
    """One line of Python that builds the peer ``peer`` of ``to`` with the converted weights in ``path``."""
    path = str(path)
    if to == "timm":
        # The overlay's num_classes: timm drops a pretrained head whose size differs from its config's (1000).
        return (f"timm.create_model({peer!r}, pretrained=True, num_classes={num_classes}, "
                f"pretrained_cfg_overlay=dict(file={path!r}, num_classes={num_classes}))")
    read = (f"safetensors.torch.load_file({path!r})" if path.endswith(".safetensors")
            else f"torch.load({path!r}, weights_only=True)")
    return f"model = torchvision.models.{peer}(num_classes={num_classes}); model.load_state_dict({read})"


def convert_run(run: str | os.PathLike, to: str, out: str | os.PathLike | None = None) -> tuple[str, Path, int]:
    """Write the weights of a run (a run directory, ``.pt`` checkpoint or ``.safetensors`` weights file) in the
    layout of ``to`` ("torchvision" or "timm"), atomically: ``.safetensors`` unless ``out`` ends in ``.pth`` or
    ``.pt``. ``out`` defaults to ``<peer>-<to>.safetensors`` beside the checkpoint. Returns the peer's model name,
    the file written and the model's number of classes; see :func:`convert_state_dict` for what converts."""
    from excite.inference import checkpoint_dir, load_for_inference
    from excite.io import atomic_write
    from excite.train.checkpoint import export_safetensors

    _check_library(to)
    model, _, _, _ = load_for_inference(run, torch.device("cpu"), fold=False)
    peer, state = convert_state_dict(model, to)
    out = Path(out) if out is not None else checkpoint_dir(run) / f"{peer}-{to}.safetensors"
    if out.suffix not in SUFFIXES:
        raise ExciteError(f"--out {out} must end in {', '.join(SUFFIXES)}")
    if not out.parent.is_dir():
        raise ExciteError(f"--out {out}: the folder {out.parent} does not exist")
    if out.suffix == ".safetensors":
        export_safetensors(state, out, {"converted_from": model.model_name, "layout": f"{to} {peer}"})
    else:
        with atomic_write(out) as f:
            torch.save(state, f)
    return peer, out, model.num_classes
