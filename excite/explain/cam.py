"""Class-activation maps: where in an image a trained model finds its evidence for a class.

Two methods, both computed by Captum (an optional extra: ``pip install 'excite[explain]'``):

- ``gradcam`` (Selvaraju et al., 2017): the channels of a feature stage (by default the last, see
  :func:`default_target_layer`), each weighted by the class score's mean gradient over it, summed, ReLU'd and
  upsampled bilinearly to the image. One forward and one backward pass; as coarse as that stage's map (an eighth
  of a CIFAR image, a thirty-second of an ImageNet one).
- ``occlusion`` (Zeiler and Fergus, 2014): how much the class score drops when a square window of the image is
  set to zero (the preset's mean colour once normalised; black with the "plain" preset), slid over the image. It
  needs no gradients and no layer, so it tests what the model does rather than how its gradients look; its
  window is a quarter of the image's side with half that as stride, 7 x 7 positions when the side is a multiple
  of 8, so 49 forward passes per image whatever its size.

Both maps are scaled per image so that their maximum is 1 (an image with no positive evidence anywhere gets an
all-zero map). :func:`cam` returns them as arrays, :func:`overlay` draws one over its image, and
:func:`explain_images` writes them for a checkpoint and image files as PNGs, ``explain.json`` and ``index.html``.
"""
from __future__ import annotations

import io
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from excite.data import decode_image
from excite.environment import select_device
from excite.errors import DataError, ExciteError, first_line
from excite.inference import expand_inputs, load_for_inference, warn
from excite.io import atomic_write, atomic_write_json
from excite.report.html import HtmlReport

METHODS = ("gradcam", "occlusion")
METHOD_TITLES = {"gradcam": "Grad-CAM", "occlusion": "occlusion"}
#: The smallest side of the PNGs written: a 32-pixel model input is enlarged 7x (nearest) to be seen.
MIN_DISPLAY_SIDE = 224
#: Occluded copies of the images per forward pass: batches of about 64 keep a CPU busy without much memory.
OCCLUSION_BATCH = 64


def default_target_layer(model: nn.Module) -> str:
    """The dotted name of the last stage of ``model``'s feature extractor: the stage whose output is the feature
    map the head pools, the last entry of an excite model's :attr:`~excite.models.ClassifierModel.feature_info`:
    ``layer4`` for the ImageNet ResNets (``layer3`` for the three-stage CIFAR ones), ``features.norm5`` for
    DenseNet (its final BatchNorm, before the ReLU, as for torchvision's ``features[-1]``; ``attn`` with SE placed
    on the final features), ``features.relu5`` for ResDense and ``features.conv5_bn_ac`` for DPN. Raises a
    ValueError for a model without ``feature_info``: name its layer instead.
    """
    if not hasattr(model, "feature_info"):
        raise ValueError(f"{type(model).__name__} does not list its feature stages: give the layer by name")
    return model.feature_info[-1]["module"]


def cam(model: nn.Module, images: torch.Tensor, *, target: int | Sequence[int] | torch.Tensor | None = None,
        method: str = "gradcam", layer: str | None = None) -> np.ndarray:
    """Class-activation maps of ``images`` (N, C, H, W, as the model takes them), an (N, H, W) float32 array in
    [0, 1] (see the module docstring for the methods).

    ``target`` is the class of each map: one index for all images, one per image, or None for each image's top-1
    prediction. ``layer`` is the dotted name of the module Grad-CAM reads (default
    :func:`default_target_layer`; occlusion ignores it). The model runs in eval mode on its own device, with its
    parameters frozen, and is handed back in the mode it came in, with no gradients on its parameters. Needs
    Captum: without it, an :class:`~excite.errors.ExciteError` says how to install it.
    """
    attr = _captum_attr()
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}: choose one of {', '.join(METHODS)}")
    if images.ndim != 4:
        raise ValueError(f"images must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
    images = images.to(next(model.parameters()).device)
    with _frozen(model):
        targets = _targets(model, images, target)
        if method == "gradcam":
            layer = layer or default_target_layer(model)
            module = _module(model, layer)
            with torch.enable_grad():  # Grad-CAM needs a backward pass, even when called under no_grad
                maps = attr.LayerGradCam(model, module).attribute(images, target=targets, relu_attributions=True)
            if maps.ndim != 4:
                raise ValueError(f"layer {layer!r} does not output a feature map (N, C, H, W): choose a stage such as "
                                 f"{_some_stages(model)}")
            maps = attr.LayerAttribution.interpolate(maps.detach(), tuple(images.shape[-2:]), "bilinear")[:, 0]
        else:
            channels, height, width = images.shape[1:]
            window = max(1, min(height, width) // 4)
            stride = max(1, window // 2)
            with torch.no_grad():
                maps = attr.Occlusion(model).attribute(
                    images, sliding_window_shapes=(channels, window, window), strides=(channels, stride, stride),
                    baselines=0, target=targets, perturbations_per_eval=max(1, OCCLUSION_BATCH // len(images)))
            maps = maps.sum(1).clamp(min=0)
    peak = maps.flatten(1).amax(1).clamp(min=torch.finfo(maps.dtype).tiny)  # an all-zero map stays zero
    return (maps / peak[:, None, None]).float().cpu().numpy()


def overlay(image: torch.Tensor, heatmap: np.ndarray, *, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``heatmap`` (H, W, values in [0, 1]) in the colours of the matplotlib colormap ``cmap``, blended over
    ``image`` (a uint8 (3, H, W) tensor) with weight ``alpha``: a uint8 (H, W, 3) array."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be a uint8 (3, H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != tuple(image.shape[1:]):
        raise ValueError(f"heatmap {heatmap.shape} and image {tuple(image.shape[1:])} differ in size")
    colours = colormaps[cmap](np.clip(heatmap, 0, 1))[..., :3] * 255
    pixels = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    return np.round((1 - alpha) * pixels + alpha * colours).astype(np.uint8)


def explain_images(checkpoint_path: str | os.PathLike, image_paths: Sequence[str | os.PathLike],
                   out_dir: str | os.PathLike, *, methods: Sequence[str] = METHODS, layer: str | None = None,
                   topk: int = 3, device: str = "auto", log: Callable[[str], None] = print,
                   log_error: Callable[[str], None] | None = None) -> list[dict]:
    """The top-``topk`` predictions of a checkpoint for each image in ``image_paths`` (files or folders,
    searched recursively) and, for each of ``methods``, a class-activation map of its top-1 class.

    Writes into ``out_dir``: ``<stem>-<method>.png`` for each image (the map over the image as the model sees
    it, enlarged to at least 224 pixels), ``explain.json`` (predictions and file names) and ``index.html`` (one
    self-contained page of them all). The model's BatchNorms stay unfolded, so ``layer`` (default
    :func:`default_target_layer`) names one of its own modules. Unreadable images are reported through
    ``log_error`` and skipped; when none can be read, :class:`~excite.errors.DataError` says so. Returns one
    dict per image, as in ``explain.json``.
    """
    _captum_attr()  # before anything is loaded: without Captum there is nothing to do
    if not methods or any(m not in METHODS for m in methods):
        raise ExciteError(f"the CAM methods are {', '.join(METHODS)}, got {', '.join(methods) or 'none'}")
    if topk < 1:
        raise ExciteError(f"--topk must be at least 1, got {topk}")
    torch_device = select_device(device)
    model, classes, transform, checkpoint = load_for_inference(checkpoint_path, torch_device, fold=False)
    try:
        layer = layer or default_target_layer(model)
        _module(model, layer)
    except ValueError as e:  # a name the user gave: one line, as for every other bad argument
        raise ExciteError(str(e)) from None
    side = checkpoint["img_size"]

    paths = expand_inputs(image_paths)
    images, skipped = [], []
    for path in paths:
        try:
            decoded = decode_image(path)
        except DataError as e:
            skipped.append(f"{path}: {first_line(e)}")
            continue
        # What the eval transform feeds the model, and the same resize as pixels to draw on.
        images.append((path, transform(decoded), TF.resize(decoded, [side, side], antialias=True)))
    if not images:
        raise DataError(f"none of the {len(paths)} inputs could be read as an image (first {skipped[0]}): give "
                        "image files, or folders of them")
    for problem in skipped:
        (log_error or warn)(f"skipping {problem}")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint.get("model_name", type(model).__name__)
    report = HtmlReport(f"Where {name} looks: class-activation maps")
    report.add_paragraph(f"Checkpoint {checkpoint_path}. Each map is for the image's top-1 class, red where the "
                         f"evidence for it is strongest. Grad-CAM weighs the channels of {layer} by the class score's "
                         "gradient; occlusion shows how much the score drops when a window of the image is set to "
                         f"{'black' if checkpoint['preset'] == 'plain' else 'the mean colour'}.")
    k = min(topk, len(classes))
    results, stems = [], set()
    for path, tensor, pixels in images:
        with torch.no_grad():
            probs = model(tensor[None].to(torch_device)).softmax(1)[0].cpu()
        values, indices = probs.topk(k)
        predictions = [{"class": classes[i], "probability": v} for i, v in zip(indices.tolist(), values.tolist())]
        stem = _unique(path.stem, stems)
        maps, figures = {}, [(_png(pixels.permute(1, 2, 0).numpy()), f"input ({side}x{side})")]
        for method in methods:
            try:
                heat = cam(model, tensor[None], target=int(indices[0]), method=method, layer=layer)[0]
            except ValueError as e:  # a layer that is no feature map: the user's choice, so one line
                raise ExciteError(str(e)) from None
            png = _png(overlay(pixels, heat))
            maps[method] = f"{stem}-{method}.png"
            with atomic_write(out_dir / maps[method]) as f:
                f.write(png)
            figures.append((png, f"{METHOD_TITLES[method]} for {predictions[0]['class']}"))
        results.append({"path": str(path), "predictions": predictions, "maps": maps})
        report.add_heading(str(path))
        report.add_table(["rank", "class", "probability"],
                         [(rank, p["class"], f"{p['probability']:.1%}") for rank, p in enumerate(predictions, 1)])
        report.add_images(figures)
        log(f"{path}: {predictions[0]['class']} ({predictions[0]['probability']:.1%})")
    atomic_write_json(out_dir / "explain.json", {"checkpoint": str(checkpoint_path), "model": name, "layer": layer,
                                                 "methods": list(methods), "img_size": side, "images": results})
    report.write(out_dir / "index.html")
    log(f"Wrote {len(results) * len(methods)} maps of {len(results)} images, explain.json and index.html to {out_dir}")
    return results


def _captum_attr():
    """``captum.attr``, imported on first use: Captum is an optional extra."""
    try:
        import captum.attr
    except ImportError:
        raise ExciteError("excite explain needs Captum: pip install 'excite[explain]'") from None
    return captum.attr


def _stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The feature extractor's stages by dotted name (see :func:`default_target_layer`): not the classifier."""
    if hasattr(model, "stage_modules"):  # every excite model
        return model.stage_modules()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return [(name, module) for name, module in model.named_children() if module is not head]


def _some_stages(model: nn.Module, count: int = 4) -> str:
    return ", ".join(name for name, _ in _stages(model)[-count:])


def _module(model: nn.Module, name: str) -> nn.Module:
    module = dict(model.named_modules()).get(name) if name else None
    if module is None:
        raise ValueError(f"{type(model).__name__} has no layer {name!r}: give a module name such as "
                         f"{_some_stages(model)}")
    return module


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode with its parameters not requiring gradients (none are computed or stored), then
    as it was."""
    training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(training)


def _targets(model: nn.Module, images: torch.Tensor, target) -> torch.Tensor:
    """One class index per image: ``target`` checked against the model's outputs, or each top-1 prediction."""
    with torch.no_grad():
        logits = model(images)
    if target is None:
        return logits.argmax(1)
    targets = torch.as_tensor(target, device=images.device).long().reshape(-1)
    if targets.numel() == 1:
        targets = targets.expand(len(images))
    if len(targets) != len(images):
        raise ValueError(f"target gives {len(targets)} classes for {len(images)} images")
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"target classes must be in 0..{logits.shape[1] - 1}, got {targets.tolist()}")
    return targets


def _png(pixels: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) image as PNG bytes, enlarged by a whole factor (nearest) to at least MIN_DISPLAY_SIDE."""
    image = Image.fromarray(pixels)
    scale = max(1, math.ceil(MIN_DISPLAY_SIDE / min(image.size)))
    if scale > 1:  # whole pixels, so the map shows the resolution the model worked at
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _unique(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``... when two images share a file name stem."""
    candidate, n = stem, 1
    while candidate in used:
        n += 1
        candidate = f"{stem}-{n}"
    used.add(candidate)
    return candidate
