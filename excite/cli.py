"""The ``excite`` command. Thin: it parses flags into the same objects the Python API takes.

User mistakes (``ExciteError``) print one line on stderr and exit with status 2; ``--debug`` shows
the traceback instead.

Only the modules that build the parser are imported here, none of which imports torch: each command
imports what it runs, so ``excite --version``, ``--help`` and ``models`` start at once.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import fnmatch
import os
import sys

from excite import __version__
from excite.bench_options import add_arguments as add_bench_arguments
from excite.errors import ExciteError, UnknownModelError
from excite.models.names import MODEL_NAMES
from excite.train.config import (
    CHOICES,
    DEVICE_HELP,
    EVAL_TTA_CHOICES,
    OPTION_GROUPS,
    TrainConfig,
    option_type,
    resolve_config,
)
from excite.train.recipes import RECIPES

TTA_HELP = "test-time augmentation: flip averages each image with its mirror (auto: as the run validated)"

DEMO_CONFIG = dict(
    # A small SE-DenseNet-BC (k=12, 3 blocks of 4 layers) on scikit-learn's 8x8 digits shown at 16 px.
    model="se_densenet_bc_100",
    model_kwargs={"block_config": [4, 4, 4]},
    data="digits",
    img_size=16,
    preset="cifar",
    hflip=False,  # a mirrored 2 is not a 2
    epochs=15,
    batch_size=64,
    # AdamW with a one-epoch warm-up: SGD's one-cycle peak reached the same accuracy but left the BN
    # running statistics behind the weights for a few epochs (validation fell to ~18% at epochs 3-4).
    opt="adamw",
    lr=3e-3,
    sched="cosine",
    warmup_epochs=1,
    weight_decay=0.05,
)


def _key_value(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as a Python literal when it is one (numbers, lists, True...)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _freeze_epochs(text: str) -> int:
    """``--freeze``: a number of epochs, or "all" (-1) for the whole run."""
    if text == "all":
        return -1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs or all, got {text!r}") from None


#: ``excite train`` flags that are not options of the run itself.
CLI_ONLY_TRAIN_FLAGS = ("config", "resume", "nproc")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """``excite train``'s flags, one per TrainConfig field, generated from the fields and their metadata."""
    groups = {name: p.add_argument_group(name) for name in OPTION_GROUPS}
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if meta.get("internal"):
            continue
        flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
        # Every default is None so that a config file can supply the value and an explicit flag still wins.
        kwargs: dict = {"dest": f.name, "default": None, "help": meta["help"]}
        kind = option_type(f.name)
        if f.name == "model_kwargs":
            kwargs.update(action="append", type=_key_value, metavar="KEY=VALUE")
        elif kind is bool:
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif f.name in CHOICES or f.name == "recipe":
            choices = sorted(RECIPES) if f.name == "recipe" else CHOICES[f.name]
            kwargs.update(choices=[c for c in choices if c is not None])
        elif f.name == "freeze":
            kwargs.update(type=_freeze_epochs, metavar="N|all")
        elif kind is list:
            kwargs.update(type=float, nargs=3, metavar=("R", "G", "B"))
        elif kind in (int, float):
            kwargs.update(type=kind)
        groups[meta["group"]].add_argument(flag, **kwargs)
    run = groups["run"]
    run.add_argument("--config", help="TOML or JSON file of options; flags override it")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="train with N processes on this machine, one per GPU (starts torchrun; --batch-size is "
                          "their batch together)")


def _train_overrides(args: argparse.Namespace) -> dict:
    names = [f.name for f in TrainConfig.__dataclass_fields__.values()]
    values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    if "model_kwargs" in values:
        values["model_kwargs"] = dict(values["model_kwargs"])
    return values


def _launch_torchrun(args: argparse.Namespace) -> int:
    """``excite train --nproc N ...`` as ``torchrun --standalone --nproc-per-node N -m excite train ...``, with torchrun
    running in this process: a process that fails ends this one with its exit status, not torchrun's traceback."""
    if args.nproc < 1:
        raise ExciteError(f"--nproc must be at least 1, got {args.nproc}")
    if "WORLD_SIZE" in os.environ:
        raise ExciteError("--nproc starts torchrun, but this process already runs under torchrun: drop --nproc")
    rest, skip = [], False
    for arg in args.argv:
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        skip = arg == "--nproc"
        if not skip:
            rest.append(arg)
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # The processes print what went wrong themselves (process 0 for all); torchrun's own report of it is noise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(["--standalone", f"--nproc-per-node={args.nproc}", "-m", "excite", *rest]))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode in (ExciteError.exit_code, 130):  # a one-line error or Ctrl-C, already reported
            return failure.exitcode
        raise ExciteError(f"process {rank} of {args.nproc} ended with exit status {failure.exitcode}; its output "
                          "above says why") from None
    return 0


def cmd_train(args: argparse.Namespace) -> int | None:
    from excite.train.fit import fit, resume_config

    if args.nproc is not None and args.nproc != 1:
        return _launch_torchrun(args)

    if args.resume:
        if args.config:
            raise ExciteError("--config cannot be combined with --resume: a resumed run keeps its own config")
        config = resume_config(args.resume, **_train_overrides(args))
        fit(config, resume=True)
    else:
        fit(resolve_config(args.config, **_train_overrides(args)))


def cmd_demo(args: argparse.Namespace) -> None:
    from excite.train.fit import fit

    config = resolve_config(None, **{**DEMO_CONFIG, "out": args.out, "device": args.device})
    result = fit(config)
    print(f"Demo finished: best validation accuracy {result.best_acc:.1%}; see {result.run_dir}/curves.png")


def cmd_eval(args: argparse.Namespace) -> None:
    from excite.inference import evaluate_checkpoint

    evaluate_checkpoint(args.checkpoint, args.data, out=args.out, batch_size=args.batch_size, device=args.device,
                        split=args.split, data_root=args.data_root, tta=args.tta)


def cmd_predict(args: argparse.Namespace) -> None:
    if args.onnx:
        from excite.export.onnx import predict_onnx

        if args.device not in ("auto", "cpu"):
            raise ExciteError(f"--onnx runs on the CPU (onnxruntime): drop --device {args.device}")
        predictions = predict_onnx(args.onnx, args.inputs, topk=args.topk, tta=args.tta)
    else:
        from excite.inference import predict

        predictions = predict(args.checkpoint, args.inputs, topk=args.topk, device=args.device, tta=args.tta)
    for path, top in predictions:
        print(f"{path}: " + ", ".join(f"{name} {p:.1%}" for name, p in top))


def cmd_export(args: argparse.Namespace) -> None:
    from excite.export import export_run

    result = export_run(args.run, out=args.out, format=args.format, opset=args.opset)
    size = result.size / 2**20
    print(f"Wrote {result.path} ({size:.1f} MiB, {result.format}, BatchNorm folded, any batch size at "
          f"{result.metadata['img_size']}x{result.metadata['img_size']})")
    print(f"Parity: the exported model's logits are within {result.max_diff:.2g} of PyTorch's (tolerance "
          f"{result.tolerance:.2g}) on random batches of 1 and 3")


def cmd_models(args: argparse.Namespace) -> None:
    # The static list, not the registry: listing names must not import torch (tests keep the two equal).
    print("\n".join(n for n in MODEL_NAMES if fnmatch.fnmatchcase(n, args.pattern)))


def _is_run(target: str) -> bool:
    """Whether ``excite summary TARGET`` names a run (a directory or checkpoint file) rather than a model: it
    exists, has a checkpoint's suffix or is a path (model names have no slash)."""
    return os.path.exists(target) or target.endswith((".pt", ".safetensors")) or os.sep in target or "/" in target


def _summary_model(args: argparse.Namespace):
    """The model ``excite summary`` describes and its default image size: a registered model built from the
    flags, or the model of a run rebuilt from its checkpoint."""
    from excite.models import create_model

    if _is_run(args.model):
        from excite.train.checkpoint import load_checkpoint, model_from_checkpoint

        given = [flag for flag, value in (("--model-arg", args.model_kwargs), ("--num-classes", args.num_classes),
                                          ("--in-chans", args.in_chans)) if value is not None]
        if given:
            raise ExciteError(f"{', '.join(given)} cannot change the model of a run: {args.model} is summarised as "
                              "it was trained")
        ckpt = load_checkpoint(args.model)
        model, _ = model_from_checkpoint(ckpt)
        return model, ckpt["img_size"]
    kwargs = dict(args.model_kwargs or [])
    for key in ("num_classes", "in_chans"):  # only when given: each model has its own default
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    try:
        return create_model(args.model, **kwargs), 224
    except UnknownModelError as e:
        raise ExciteError(str(e)) from None
    except (TypeError, ValueError) as e:  # an argument the builder does not take, or a value it cannot use
        raise ExciteError(f"cannot build {args.model} with {kwargs} ({e})") from None


def cmd_summary(args: argparse.Namespace) -> None:
    from excite.models import summary

    for flag, value in (("--img-size", args.img_size), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ExciteError(f"{flag} must be at least 1, got {value}")
    model, img_size = _summary_model(args)
    img_size = args.img_size or img_size
    try:
        table = summary(model, img_size=img_size, batch_size=args.batch_size, depth=args.depth)
    except RuntimeError as e:  # the input shrinks to nothing before the model's last layer
        raise ExciteError(f"{model.model_name} cannot take {img_size}x{img_size} images "
                          f"({str(e).splitlines()[0]}); use a larger --img-size") from None
    print(table)


def cmd_bench(args: argparse.Namespace) -> None:
    from excite.bench import main_bench

    main_bench(args)


def cmd_sweep(args: argparse.Namespace) -> None:
    from excite.experiments.sweep import main_sweep

    main_sweep(args)


def cmd_compare(args: argparse.Namespace) -> None:
    from excite.experiments.compare import compare_runs

    comparison = compare_runs(args.runs, out=args.out, force=args.force)
    for warning in comparison.warnings:
        print(f"excite: warning: compared with --force although {warning}", file=sys.stderr)
    print(comparison.format_table())
    for note in comparison.notes:
        print(f"Note: {note}")
    print(f"Wrote comparison.csv, comparison.md, the plots and report.html in {comparison.out}")


def cmd_explain(args: argparse.Namespace) -> None:
    from excite.explain.cam import explain_images
    from excite.inference import checkpoint_dir

    out = args.out or checkpoint_dir(args.run) / "explain"
    explain_images(args.run, args.images, out, methods=[m for m in args.method.split(",") if m], layer=args.layer,
                   topk=args.topk, device=args.device)


def cmd_excitation(args: argparse.Namespace) -> None:
    from excite.explain.report import excitation_report

    excitation_report(args.run, args.data, out=args.out, split=args.split, batch_size=args.batch_size,
                      device=args.device, data_root=args.data_root)


def cmd_convert(args: argparse.Namespace) -> None:
    from excite.models.convert import convert_run, how_to_load

    peer, out, num_classes = convert_run(args.run, args.to, args.out)
    print(f"Wrote {out} in {args.to}'s {peer} layout; load it with {how_to_load(args.to, peer, out, num_classes)}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (and exit status 2), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="excite", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"excite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train a model on an image folder, CIFAR or digits")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train a small SE-DenseNet on the bundled digits (CPU, about 30 s)")
    p.add_argument("--out", help="run directory (default runs/<model>-<time>)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", help="top-1/top-5, per-class report and confusion matrix of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a .pt checkpoint or a run directory")
    p.add_argument("--data", required=True, help="image folder, or cifar10 / cifar100 / digits")
    p.add_argument("--split", choices=("auto", "val", "all", "test"), default="auto",
                   help="val: the run's own validation split; all: every image of a folder; test: CIFAR's test "
                        "set (auto: val on the training data, else test for CIFAR, all for a folder)")
    p.add_argument("--data-root")
    p.add_argument("--out", help="where to write eval.json and confusion_matrix.png")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", choices=EVAL_TTA_CHOICES, default="auto", help=TTA_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k classes of images")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a .pt checkpoint, a .safetensors file or a run directory")
    model.add_argument("--onnx", metavar="FILE", help="an ONNX file from `excite export`, run by onnxruntime on the "
                                                     "CPU with the preprocessing stored in it")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--tta", choices=EVAL_TTA_CHOICES, default="auto", help=TTA_HELP)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="a run's model as an ONNX file (or torch.export program), checked against "
                                      "PyTorch")
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoint or weights file")
    p.add_argument("--format", choices=("onnx", "torch-export"), default="onnx",
                   help="onnx (for onnxruntime and other runtimes) or torch-export (a .pt2 torch.export program)")
    p.add_argument("--out", help="the file to write (default: beside the checkpoint, e.g. best.onnx)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list model names")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'se_*'")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("summary", help="layer table: output shapes, parameters, MACs and memory estimates")
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="a model name, or a run directory or checkpoint (.pt, .safetensors) to rebuild its model")
    p.add_argument("--model-arg", dest="model_kwargs", action="append", type=_key_value, metavar="KEY=VALUE",
                   help="builder override, as for train (repeatable)")
    p.add_argument("--img-size", type=int, help="side of the square input (default 224, or the run's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch for MACs and memory (default 1)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's own)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's own)")
    p.add_argument("--depth", type=int, default=3, help="how deep to list nested layers")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("bench", help="training/inference throughput and memory against torchvision and timm")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("sweep", help="train runs over models, options and seeds; say which differences beat seed noise")
    from excite.experiments.grid import add_sweep_arguments  # torch-free; it reads this module's train options

    add_sweep_arguments(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("explain", help="top-k predictions and class-activation maps (where the model looks) of images")
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoint or weights file")
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--method", default="gradcam,occlusion",
                   help="comma-separated CAM methods: gradcam, occlusion (gradient-free) (default both)")
    p.add_argument("--layer", help="the module Grad-CAM reads, e.g. layer3 (default: the last feature stage)")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--out", help="where to write the maps, explain.json and index.html (default: explain/ beside "
                                 "the checkpoint)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("excitation", help="what the attention gates learned, per class and depth (the SENet paper)")
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoint or weights file")
    p.add_argument("--data", required=True, help="image folder, or cifar10 / cifar100 / digits")
    p.add_argument("--split", choices=("auto", "val", "all", "test"), default="auto",
                   help="which images, as for eval (auto: the run's validation split on its training data)")
    p.add_argument("--data-root")
    p.add_argument("--out", help="where to write the figures, excitation.json and excitation.html "
                                 "(default excitation-<data> beside the checkpoint)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_excitation)

    p = sub.add_parser("convert", help="write a run's weights in torchvision's or timm's layout, for their models")
    p.add_argument("run", metavar="RUN", help="a run directory, or its checkpoint or weights file")
    p.add_argument("--to", required=True, choices=("torchvision", "timm"), help="the library whose model loads them")
    p.add_argument("--out", help="the file to write: .safetensors, or .pth for torch.load (default "
                                 "<peer>-<library>.safetensors beside the checkpoint)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("compare", help="runs side by side: one table, overlaid curves and an HTML report")
    p.add_argument("runs", nargs="+", metavar="RUN", help="a run directory, or a folder of them (a sweep)")
    p.add_argument("--out", help="where to write the table, plots and report.html (default comparison-<time>)")
    p.add_argument("--force", action="store_true",
                   help="also compare runs trained on different data or classes or validated on other images (the "
                        "report warns)")
    p.set_defaults(func=cmd_compare)
    return parser


def _out_of_memory_errors() -> tuple[type[BaseException], ...]:
    # Evaluated only when an exception reaches that clause: torch's error can only be raised once torch is imported.
    torch = sys.modules.get("torch")
    return (MemoryError, torch.OutOfMemoryError) if torch is not None else (MemoryError,)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":  # --nproc starts `excite train` again under torchrun, with these arguments
        args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        status = args.func(args)
    except ExciteError as e:
        if args.debug:
            raise
        if not getattr(e, "quiet", False):  # quiet: another process of a torchrun job already said it
            print(f"excite: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("excite: interrupted", file=sys.stderr)
        return 130
    except _out_of_memory_errors():  # fit() names the batch size; eval/predict/bench end here
        if args.debug:
            raise
        print("excite: error: out of memory; try a smaller --batch-size or --img-size, or --device cpu",
              file=sys.stderr)
        return 2
    except OSError as e:  # what the system refused (a full disk, a read-only folder), and for which file
        if args.debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        # Every file excite writes is replaced atomically, so a failed write leaves the previous version. Whether a
        # run can resume is fit's to say (a failed write there is a WriteRefused, above), not this branch's.
        print(f"excite: error: {e.strerror or e}{where}; the files written before are intact", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
