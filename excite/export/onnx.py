"""ONNX: the export itself, and ``excite predict --onnx`` (onnxruntime, with the preprocessing the file records).

The exporter is torch's own (``torch.onnx.export(..., dynamo=True)``, the default since torch 2.9), fed the
``torch.export`` program that ``--format torch-export`` saves. On torch 2.14 it exports every excite family
(DenseNet, SE-DenseNet, ResNet with SE, ECA or CBAM, DPN, the ResDense hybrid) to within 3e-7 of PyTorch's
logits, as does the TorchScript exporter (``dynamo=False``); the latter is deprecated ("will be removed")
and would trace the model a second, different way. The cost of the dynamo exporter: seconds per export
instead of a fraction of one.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from excite.data.transforms import build_transform
from excite.errors import ExciteError, first_line
from excite.export import INPUT_NAME, METADATA_KEY, OUTPUT_NAME
from excite.inference import check_predict_sizes, classify, resolve_tta
from excite.train.loop import predict_logits

INSTALL_HINT = "pip install 'excite[export]'"


def require(runtime: bool = True) -> None:
    """An :class:`ExciteError` saying how to install them unless onnx and onnxscript (torch's ONNX exporter needs
    both) and, with ``runtime``, onnxruntime (for the parity check) can be imported."""
    packages = ("onnx", "onnxscript") + (("onnxruntime",) if runtime else ())
    try:
        for package in packages:
            importlib.import_module(package)
    except ImportError:
        raise ExciteError(f"excite export needs onnx, onnxscript and onnxruntime: {INSTALL_HINT}") from None


def to_onnx(program: torch.export.ExportedProgram, metadata: dict, opset: int | None = None) -> bytes:
    """The ONNX model of ``program`` as bytes, with ``metadata`` as JSON in its ``metadata_props``."""
    import onnx

    kwargs = {} if opset is None else {"opset_version": opset}
    opset_text = f" opset {opset}" if opset is not None else ""
    try:
        # verbose=False: the exporter otherwise prints its progress on stdout.
        with _quiet_loggers("torch.onnx", "onnxscript"):
            exported = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME],
                                         output_names=[OUTPUT_NAME], verbose=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; each means no ONNX model
        raise ExciteError(f"cannot export {metadata['model_name']} to ONNX{opset_text} ({first_line(e)})") from e
    model = exported.model_proto
    _name_batch_axis(model)
    written = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and written != opset:
        # Below its own opsets (18 on) the exporter converts the model, and keeps its own opset when it cannot.
        raise ExciteError(f"torch's ONNX exporter cannot write {metadata['model_name']} in opset {opset} (it "
                          f"wrote opset {written}): choose --opset {written} or leave --opset out")
    onnx.helper.set_model_props(model, {METADATA_KEY: json.dumps(metadata)})
    return model.SerializeToString()


def _name_batch_axis(model) -> None:
    """Call the input's first axis "batch" everywhere in the graph: from an ExportedProgram the exporter names it
    after torch's symbol (s77), which tells a reader of the file nothing."""
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"


@contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from these loggers while the block runs: the exporter logs each step of a failed opset
    conversion with its traceback, where one line of ours says what happened."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _session(model: bytes | str, origin: str):
    try:
        import onnxruntime
    except ImportError:
        raise ExciteError(f"running ONNX models needs onnxruntime: {INSTALL_HINT}") from None
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    try:
        return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NotImplemented) as e:
        raise ExciteError(f"{origin} is not an ONNX model onnxruntime can run ({first_line(e)})") from None


def _forward(session) -> Callable[[torch.Tensor], torch.Tensor]:
    input_name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {input_name: np.ascontiguousarray(x.numpy())})[0])


def runner(model: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX model in ``model`` as a function of a CPU float32 batch, run by onnxruntime on the CPU."""
    return _forward(_session(model, "the exported model"))


def load_onnx(path: str | os.PathLike):
    """An onnxruntime session of an ONNX file written by ``excite export``, and the metadata stored in it."""
    path = Path(path)
    if not path.is_file():
        raise ExciteError(f"ONNX file {path} does not exist")
    session = _session(str(path), str(path))
    stored = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        metadata = json.loads(stored) if stored else None
    except json.JSONDecodeError:
        metadata = None
    if not isinstance(metadata, dict) or not {"classes", "img_size", "preset"} <= metadata.keys():
        raise ExciteError(f"{path} has no excite metadata (classes, image size, preprocessing): predict with ONNX "
                          "files written by `excite export`")
    return session, metadata


def predict_onnx(path: str | os.PathLike, inputs: Sequence[str | os.PathLike], *, topk: int = 3,
                 batch_size: int = 64, tta: str = "auto",
                 log_error=None) -> Iterator[tuple[str, list[tuple[str, float]]]]:
    """:func:`excite.inference.predict` with an ONNX file from ``excite export``, run by onnxruntime on the CPU:
    the images are resized and normalised as the file's metadata says (the run's own eval transform), and
    ``tta="auto"`` is the test-time augmentation the run validated with."""
    check_predict_sizes(topk, batch_size)
    session, metadata = load_onnx(path)
    tta = resolve_tta(tta, metadata)
    recorded = metadata.get("input", {})  # the mean and std it was normalised with, and any centre crop
    transform = build_transform(metadata["preset"], metadata["img_size"], train=False, mean=recorded.get("mean"),
                                std=recorded.get("std"), crop_pct=recorded.get("crop_pct"))
    forward = _forward(session)
    yield from classify(lambda images: predict_logits(forward, images, tta), inputs, metadata["classes"], transform,
                        topk=topk, batch_size=batch_size, log_error=log_error)
