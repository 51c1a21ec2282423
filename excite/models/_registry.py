"""A tiny model registry: one dict, a decorator that refuses duplicates, and a factory."""
from __future__ import annotations

import difflib
import fnmatch
import importlib
import os
from typing import Callable

from torch import nn

from excite.errors import UnknownModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
#: The modules whose builders register themselves when imported (on the first look-up, not before: importing the
#: package stays light).
_FAMILIES = ("excite.models.densenet", "excite.models.dpn", "excite.models.resdense", "excite.models.resnet")


def _builders() -> dict[str, Callable[..., nn.Module]]:
    for family in _FAMILIES:
        importlib.import_module(family)
    return _MODELS


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name; a second builder with the same name is an error."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models that match a shell-style ``pattern``."""
    return sorted(n for n in _builders() if fnmatch.fnmatchcase(n, pattern))


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as ``name``; an unknown name raises :class:`~excite.errors.UnknownModelError` (a
    ``ValueError``) listing close matches."""
    try:
        return _builders()[name]
    except KeyError:
        close = difflib.get_close_matches(name, _MODELS, n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "run `excite models` to list them."
        raise UnknownModelError(f"unknown model {name!r}: {hint}") from None


def create_model(name: str, pretrained=None, **kwargs) -> nn.Module:
    """Build the registered model ``name``.

    Keyword arguments go to the builder: every model accepts ``num_classes``, ``in_chans`` and
    ``drop_rate``, and each family adds its own (``growth_rate``, ``attn_layer``...). The model
    remembers ``model_name`` and ``model_kwargs`` so that a checkpoint can rebuild it.
    ``pretrained`` is a state dict or what ``excite train --pretrained`` takes: a weights file, a URL,
    ``"torchvision"``, a torchvision weights name (``"IMAGENET1K_V1"``, ``"ResNet50_Weights.IMAGENET1K_V2"``) or
    ``"timm:NAME[.TAG]"`` (see :func:`~excite.models.pretrained.resolve_pretrained`: named weights come from their
    library's cache, fetched once). It is loaded with :func:`~excite.models.load_weights` (a classifier of another
    size and attention layers the weights lack start fresh, with a warning); ``True`` raises a ValueError, as it
    does not say which weights.
    """
    if pretrained is True:
        raise ValueError(f"pretrained=True cannot say which weights to load into {name}: pass a weights file, a URL, "
                         "'torchvision', a torchvision weights name (IMAGENET1K_V1), 'timm:NAME' or a state dict")
    model = get_model_builder(name)(**kwargs)
    model.model_name = name  # before loading, so that load_weights' warnings name the model
    model.model_kwargs = dict(kwargs)
    if pretrained is not None and pretrained is not False:
        from excite.models.pretrained import resolve_pretrained
        from excite.models.weights import load_weights

        named = isinstance(pretrained, (str, os.PathLike))
        load_weights(model, resolve_pretrained(pretrained, name).path if named else pretrained)
    return model
