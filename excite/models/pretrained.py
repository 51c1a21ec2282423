"""Pretrained weights by name: find the file ``--pretrained`` means, and the input pipeline it was trained with.

:func:`resolve_pretrained` turns what the user wrote into a local file (then loaded by
:func:`~excite.models.weights.load_weights`, the one loader) and, where the weights say, their preprocessing:

- a file: used as it is; an excite weights file or checkpoint also tells its preset, size and normalisation;
- a URL: fetched into torch.hub's cache (``torch.hub.get_dir()/checkpoints``, as ``load_state_dict_from_url``
  does) unless it is already there;
- ``torchvision``: the default torchvision weights of the model's torchvision counterpart (excite's
  ``densenet121`` is torchvision's ``densenet121``); a weights name, ``IMAGENET1K_V1`` (of the counterpart) or
  ``ResNet50_Weights.IMAGENET1K_V2`` (of any model: plain ResNet weights into an SE-ResNet), through torchvision's
  weights API and torch.hub's cache;
- ``timm:NAME[.TAG]``: timm's pretrained config of that name (mean, std, input size, crop) and its file from the
  Hugging Face Hub cache (``hf_hub_download``: ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` apply). Needs timm.

Nothing is downloaded when the file is already in its cache; a file that cannot be fetched is one line naming
the weights, the file and the folder to put it in.
"""
from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from excite.errors import CheckpointError, ExciteError, first_line

#: excite models whose torchvision counterpart has the same name and architecture.
TORCHVISION_MODELS = ("densenet121", "densenet161", "densenet169", "densenet201",
                      "resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
#: Where timm has weights for excite's models, for messages (timm's name first).
TIMM_MODELS = ("densenet121/161/169/201, resnet18-152, seresnet50 (se_resnet50), legacy_seresnet18-152 "
               "(se_resnet18-152), dpn68, dpn92")
#: The extra that installs what ``timm:`` names need.
PRETRAINED_EXTRA = "pip install 'excite[pretrained]'"
# A torchvision weights name: an enum member (IMAGENET1K_V1, DEFAULT), optionally after its enum (ResNet50_Weights.).
_WEIGHTS_NAME = re.compile(r"(?:(\w+_Weights)\.)?([A-Z][A-Z0-9_]*)")


@dataclass(frozen=True)
class Preprocessing:
    """How the weights' inputs were prepared: ``preset`` (excite's augmentation style), the square side
    ``img_size``, the normalisation ``mean`` and ``std`` (None: the preset's), and ``crop_pct`` (the centre crop's
    share of the resized side; None: the image resized to ``img_size`` whole)."""

    preset: str
    img_size: int
    mean: Optional[tuple[float, ...]] = None
    std: Optional[tuple[float, ...]] = None
    crop_pct: Optional[float] = None


@dataclass(frozen=True)
class PretrainedWeights:
    """A resolved ``--pretrained``: the local ``path`` to load, what it is (for messages), and its
    ``preprocessing`` when the weights tell it (None: a plain file or URL)."""

    path: Path
    description: str
    preprocessing: Optional[Preprocessing] = None


def resolve_pretrained(spec: str | os.PathLike, model_name: str) -> PretrainedWeights:
    """The weights ``spec`` names for the excite model ``model_name``, fetched into their library's cache if
    need be (see the module's docstring for what ``spec`` may be). Raises :class:`CheckpointError` (one line) for
    weights that cannot be found or fetched, and :class:`ExciteError` for a name that does not fit the model."""
    text = str(spec)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):  # before any Path(): it would turn https:// into https:/
        path = _torch_hub_file(text, text)
        return PretrainedWeights(path, text, _excite_preprocessing(path))
    if text.startswith("timm:"):
        return _timm_weights(text[len("timm:"):])
    path = Path(text).expanduser()
    if path.exists() or not (text == "torchvision" or _WEIGHTS_NAME.fullmatch(text)):
        if not path.is_file():
            raise CheckpointError(f"weights file {path} does not exist (--pretrained also takes a URL, torchvision, "
                                  "a torchvision weights name such as IMAGENET1K_V1, or timm:NAME)")
        return PretrainedWeights(path, str(path), _excite_preprocessing(path))
    return _torchvision_weights(text, model_name)


def _no_weights(library: str, model_name: str) -> ExciteError:
    return ExciteError(
        f"{library} has no weights for {model_name}. torchvision has weights for {', '.join(TORCHVISION_MODELS)} "
        f"(--pretrained torchvision or IMAGENET1K_V1; an SE model can start from its plain counterpart's by the "
        f"full name, e.g. ResNet50_Weights.IMAGENET1K_V2 for se_resnet50); timm for {TIMM_MODELS} "
        f"(--pretrained timm:NAME)")


def _torchvision_weights(text: str, model_name: str) -> PretrainedWeights:
    from torchvision import models

    enum_name, member = (None, None) if text == "torchvision" else _WEIGHTS_NAME.fullmatch(text).groups()
    if enum_name is None and model_name not in TORCHVISION_MODELS:
        raise _no_weights("torchvision", model_name)
    try:
        if enum_name is None:
            weights_enum = models.get_model_weights(model_name)
            weights = weights_enum.DEFAULT if member is None else weights_enum[member]
        else:
            weights = models.get_weight(f"{enum_name}.{member}")
    except (KeyError, ValueError, AttributeError) as e:
        choices = (", ".join(w.name for w in models.get_model_weights(model_name))
                   if enum_name is None else f"see torchvision.models.{enum_name}")
        raise ExciteError(f"torchvision has no weights {text!r} for {model_name} ({first_line(e)}); its weights: "
                          f"{choices}") from None
    what = f"torchvision's {type(weights).__name__}.{weights.name}"
    pipeline = weights.transforms()
    side, resized = pipeline.crop_size[0], pipeline.resize_size[0]
    preprocessing = Preprocessing("imagenet", side, tuple(pipeline.mean), tuple(pipeline.std), side / resized)
    return PretrainedWeights(_torch_hub_file(weights.url, what), what, preprocessing)


def _torch_hub_file(url: str, what: str) -> Path:
    """``url``'s file in torch.hub's cache (where ``load_state_dict_from_url`` keeps it), fetched if not there;
    a name with a hash (``densenet121-a639ec97.pth``) is checked against it, as torch.hub does."""
    import torch.hub

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    name = os.path.basename(urlparse(url).path)
    path = folder / name
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    digest = torch.hub.HASH_REGEX.search(name)
    try:
        torch.hub.download_url_to_file(url, str(path), digest.group(1) if digest else None, progress=True)
    except (OSError, RuntimeError, ValueError) as e:  # URLError and HTTPError are OSErrors; a bad hash, RuntimeError
        raise CheckpointError(f"could not fetch {what} ({first_line(e)}): put {name} (from {url}) in "
                              f"{folder}") from None
    return path


def _timm_weights(name: str) -> PretrainedWeights:
    try:
        timm_models = importlib.import_module("timm.models")
    except ImportError:
        raise ExciteError(f"--pretrained timm:{name} needs timm: {PRETRAINED_EXTRA}") from None
    try:
        cfg = timm_models.get_pretrained_cfg(name)
    except RuntimeError as e:  # an unknown tag
        raise ExciteError(f"timm has no pretrained weights {name!r} ({first_line(e)})") from None
    if cfg is None:
        raise ExciteError(f"timm has no pretrained weights {name!r}: give timm:NAME[.TAG] of a timm model (see "
                          f"timm.list_pretrained()); timm has weights for {TIMM_MODELS}")
    what = f"timm's {cfg.architecture}.{cfg.tag}" if cfg.tag else f"timm's {cfg.architecture}"
    if cfg.hf_hub_id:
        path = _hf_hub_file(cfg.hf_hub_id, cfg.hf_hub_filename, what)
    elif cfg.url:
        path = _torch_hub_file(cfg.url, what)
    else:
        raise ExciteError(f"{what} has no file to download (timm's config gives neither a Hub id nor a URL)")
    side = cfg.input_size[-1]
    preprocessing = Preprocessing("imagenet", side, tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct)
    return PretrainedWeights(path, what, preprocessing)


def _hf_hub_file(repo_id: str, filename: Optional[str], what: str) -> Path:
    """The weights of the Hub repository ``repo_id`` from huggingface_hub's cache, fetched if not there: its
    ``filename``, else timm's ``model.safetensors`` or ``pytorch_model.bin``."""
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError
    except ImportError:
        raise ExciteError(f"{what} is on the Hugging Face Hub, which needs huggingface_hub: "
                          f"{PRETRAINED_EXTRA}") from None
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    reason = ""
    for name in names:
        try:
            return Path(hf_hub_download(repo_id, name))
        except RemoteEntryNotFoundError:  # the repository has no such file: try the next name
            continue
        except LocalEntryNotFoundError as e:  # offline, or no network, and not in the cache
            reason = reason or first_line(e)
        except OSError as e:
            raise CheckpointError(f"could not fetch {what} from the Hugging Face Hub ({first_line(e)})") from None
    if not reason:
        raise CheckpointError(f"the Hub repository {repo_id} holds none of {', '.join(names)}")
    offline = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "no network"
    folder = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    raise CheckpointError(f"{offline} to fetch {what} and it is not in the cache: put {names[0]} (from "
                          f"https://huggingface.co/{repo_id}) in {folder}/snapshots/<commit>/ with the commit in "
                          f"{folder}/refs/main, or run once online")


def _excite_preprocessing(path: Path) -> Optional[Preprocessing]:
    """The preset, size and normalisation an excite weights file or checkpoint was trained with; None for any
    other file (a torchvision or timm state dict says nothing about its inputs)."""
    from excite.data.transforms import INPUT_OPTIONS
    from excite.train.checkpoint import load_checkpoint  # here: excite.train imports this package

    try:
        stored = load_checkpoint(path)
    except CheckpointError:  # not excite's file, or a damaged one: load_weights says what is wrong
        return None
    mean, std, crop_pct = (stored.get("config", {}).get(name) for name in INPUT_OPTIONS)
    return Preprocessing(stored["preset"], stored["img_size"], tuple(mean) if mean else None,
                         tuple(std) if std else None, crop_pct)
