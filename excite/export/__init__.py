"""A trained run as a file that runs without excite: ONNX (for onnxruntime and other runtimes) or a
``torch.export`` program (``.pt2``).

:func:`export_run` loads the run as ``excite predict`` does, folds its BatchNorms into the convolutions, exports
the model with a dynamic batch axis and records what a runtime needs to feed it (the classes, the image size,
the resize and the normalisation). Before the file is written, the exported model is run on sample batches
and compared with the PyTorch model as trained (unfolded, eager): a file that does not compute the same
logits is refused, and nothing is written.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from excite import __version__
from excite.data.transforms import input_options, normalization, resize_side
from excite.errors import ExciteError, first_line
from excite.inference import checkpoint_dir, load_for_inference, resolve_checkpoint
from excite.io import atomic_write
from excite.nn.fold import fold_batchnorm

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
#: Names of the exported model's input and output.
INPUT_NAME, OUTPUT_NAME = "input", "logits"
#: The metadata_props key (ONNX) and extra file (.pt2) that hold the JSON of :func:`export_metadata`.
METADATA_KEY = "excite"
#: Largest tolerated difference between the exported model's logits and PyTorch's, relative to the largest
#: logit (at least 1). float32 rounding, and folding BatchNorm (which reorders the arithmetic), move logits
#: by about 1e-7 of their size in small models and stay far below 1e-5 in deep ones; an export that is wrong
#: (a missing layer, a different padding or pooling) moves them by about their own size. 1e-4 is two orders
#: of magnitude above the rounding and several below a real mistake.
PARITY_TOLERANCE = 1e-4
#: Batch sizes of the parity check: 1, and more than the batch of 2 the model is traced with.
PARITY_BATCHES = (1, 3)


@dataclass
class ExportResult:
    """What :func:`export_run` wrote: the file, its format and size, the metadata stored in it, and how far the
    exported model's logits were from PyTorch's on the check's inputs (None when not checked)."""

    path: Path
    format: str
    size: int
    metadata: dict
    max_diff: float | None
    tolerance: float | None


def export_run(run: str | os.PathLike, out: str | os.PathLike | None = None, format: str = "onnx",
               opset: int | None = None, check: bool = True) -> ExportResult:
    """Export the model of ``run`` (a run directory, ``.pt`` checkpoint or ``.safetensors`` weights file) to
    ``out`` (default: beside the checkpoint, named after it: ``best.onnx``, ``best.pt2``).

    ``format`` is ``"onnx"`` (``opset``: the ONNX opset, default the exporter's) or ``"torch-export"``. The
    model is exported in eval mode, in float32 on the CPU, with BatchNorm folded, for any batch size and the
    run's image size. With ``check`` (the default) the file's model is run on random batches of
    :data:`PARITY_BATCHES` images and its logits compared with the unfolded PyTorch model's; a difference
    above :data:`PARITY_TOLERANCE` (relative to the largest logit) raises an :class:`ExciteError` and leaves no
    file. The file is written atomically: an error leaves any previous ``out`` as it was.
    """
    if format not in FORMATS:
        raise ExciteError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if opset is not None and format != "onnx":
        raise ExciteError("--opset applies to --format onnx only")
    if format == "onnx":
        from excite.export import onnx as onnx_export

        onnx_export.require(check)  # before the run is loaded: without the packages there is nothing to do
    source = resolve_checkpoint(run)
    reference, _, _, checkpoint = load_for_inference(source, torch.device("cpu"), fold=False)
    reference = reference.float()
    out = Path(out) if out is not None else checkpoint_dir(run) / f"{source.stem}{FORMATS[format]}"
    if out.suffix != FORMATS[format]:
        raise ExciteError(f"--out {out} does not end with {FORMATS[format]}, the suffix of --format {format}")
    metadata = export_metadata(checkpoint, source)
    program = export_program(fold_batchnorm(reference), checkpoint["img_size"], metadata["model_name"])
    if format == "onnx":
        data = onnx_export.to_onnx(program, metadata, opset)
        run_exported = onnx_export.runner(data) if check else None
    else:
        data = _save_program(program, metadata)
        run_exported = _load_program(data).module() if check else None
    max_diff = tolerance = None
    if check:
        max_diff, tolerance = parity(reference, run_exported, checkpoint["img_size"])
        if not max_diff <= tolerance:  # also refuses NaN
            raise ExciteError(f"the exported model's logits differ from PyTorch's by up to {max_diff:.3g} (tolerance "
                              f"{tolerance:.3g}): {out} was not written; please report this with the model's name")
    with atomic_write(out) as f:
        f.write(data)
    return ExportResult(out, format, len(data), metadata, max_diff, tolerance)


def export_metadata(checkpoint: dict, source: Path) -> dict:
    """What a runtime needs to use the exported model, and where it came from, as stored in the file."""
    size, options = checkpoint["img_size"], input_options(checkpoint.get("config", {}))
    mean, std = normalization(checkpoint["preset"], options["mean"], options["std"])
    crop_pct = options["crop_pct"]
    resize = (f"{size}x{size}, bilinear with antialiasing, aspect ratio not kept" if crop_pct is None else
              f"shorter side to {resize_side(size, crop_pct)}, bilinear with antialiasing, then the centre "
              f"{size}x{size} crop ({crop_pct:g} of the side)")
    return {
        "excite_version": __version__,
        "model_name": checkpoint["model_name"],
        "model_kwargs": checkpoint["model_kwargs"],
        "classes": list(checkpoint["classes"]),
        "img_size": checkpoint["img_size"],
        "preset": checkpoint["preset"],
        # The eval transform of excite.data.transforms.build_transform, spelt out for runtimes without excite.
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "channels": "RGB",
                  "resize": resize, "crop_pct": crop_pct, "scale": "pixel / 255", "mean": list(mean), "std": list(std),
                  "normalize": "(scaled - mean) / std, per channel"},
        "output": {"name": OUTPUT_NAME, "meaning": "logits, one per class in the order of classes (softmax for "
                                                   "probabilities)"},
        "tta": checkpoint.get("config", {}).get("tta") or "none",
        "source": str(source),
        "source_sha256": _sha256(source),
        "bn_folded": True,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_program(model: torch.nn.Module, img_size: int, name: str) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` with a dynamic batch axis. Both formats start from it: the ONNX exporter
    translates this program, so the two files hold the same graph."""
    # Traced with a batch of 2: torch.export specialises an example dimension of size 1 to a constant.
    example = torch.randn(2, 3, img_size, img_size)
    batch = torch.export.Dim("batch", min=1)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; each means this model cannot be exported
        raise ExciteError(f"torch.export cannot export {name} ({first_line(e)}); please report this with the "
                          "model's name and arguments") from e


def _save_program(program: torch.export.ExportedProgram, metadata: dict) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    return buffer.getvalue()


def _load_program(data: bytes | str | os.PathLike, extra_files: dict | None = None) -> torch.export.ExportedProgram:
    return torch.export.load(io.BytesIO(data) if isinstance(data, bytes) else data, extra_files=extra_files)


def load_torch_export(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The model (a callable module) and the metadata of a ``.pt2`` file written by :func:`export_run`."""
    extra = {f"{METADATA_KEY}.json": ""}
    program = _load_program(path, extra)
    if not extra[f"{METADATA_KEY}.json"]:
        raise ExciteError(f"{path} has no excite metadata: export it with `excite export --format torch-export`")
    return program.module(), json.loads(extra[f"{METADATA_KEY}.json"])


@torch.no_grad()
def parity(reference: torch.nn.Module, exported, img_size: int, seed: int = 0) -> tuple[float, float]:
    """The largest absolute difference between the logits of ``exported`` (a callable on CPU float32 batches)
    and ``reference`` on random batches of :data:`PARITY_BATCHES` images, and the tolerance it is held to."""
    generator = torch.Generator().manual_seed(seed)
    diffs, scale = [], 1.0
    for batch in PARITY_BATCHES:
        x = torch.randn(batch, 3, img_size, img_size, generator=generator)
        expected, got = reference(x).float(), torch.as_tensor(exported(x)).float()
        if got.shape != expected.shape:
            raise ExciteError(f"the exported model returns shape {tuple(got.shape)} for a batch of {batch}, PyTorch "
                              f"{tuple(expected.shape)}; please report this with the model's name")
        diffs.append((got - expected).abs().max())
        scale = max(scale, expected.abs().max().item())
    return torch.stack(diffs).max().item(), PARITY_TOLERANCE * scale  # torch's max keeps a NaN, Python's may not
