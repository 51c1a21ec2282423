"""A torchinfo-like layer table: output shape, parameters and multiply-accumulates of every layer.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (one MAC = two FLOPs), which counts
the matrix products and convolutions that dominate a CNN's cost; element-wise ops count as zero.
Sizes are in MiB (2**20 bytes), as everywhere in excite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class LayerRow:
    """One module of the table: its dotted name, nesting depth, type and what one forward pass gave."""

    name: str
    depth: int
    kind: str
    output_shape: tuple[int, ...] | None
    params: int
    macs: int


def format_count(n: int) -> str:
    """``n`` to three significant digits in K, M, G or T (``40.8 M``, ``2.83 G``); below 1,000 as it is."""
    value, unit = float(n), ""
    for bigger in ("K", "M", "G", "T"):
        if value < 999.5:  # what rounds to 1,000 is shown as 1.00 in the next unit
            break
        value, unit = value / 1000, bigger
    if not unit:
        return f"{n:,}"
    decimals = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{value:.{decimals}f} {unit}"


@dataclass
class ModelSummary:
    """The result of :func:`summary`; ``str()`` renders the table and the totals, :meth:`to_dict` the totals
    alone.

    ``activation_bytes`` estimates what one training step keeps for backward as torchinfo does: the outputs
    of every leaf layer that has parameters (convolutions, BatchNorms, Linears), twice (for their gradients).
    It leaves out concatenations, element-wise products and the optimizer state, and counts float32
    outputs (about half under bf16 autocast).
    """

    title: str
    rows: list[LayerRow]
    input_shape: tuple[int, ...]
    total_params: int
    trainable_params: int
    total_macs: int
    input_bytes: int
    param_bytes: int
    activation_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        """Input, forward/backward pass and parameters: torchinfo's "Estimated Total Size"."""
        return self.input_bytes + self.activation_bytes + self.param_bytes

    def to_dict(self) -> dict[str, Any]:
        """The totals as plain numbers, for a JSON file (MACs for the whole ``input_shape`` batch)."""
        return {"model": self.title, "input_shape": list(self.input_shape), "total_params": self.total_params,
                "trainable_params": self.trainable_params, "total_macs": self.total_macs,
                "input_bytes": self.input_bytes, "param_bytes": self.param_bytes,
                "activation_bytes": self.activation_bytes}

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Param #", "MACs")
        table = [(f"{'  ' * (r.depth - 1)}{r.name.rsplit('.', 1)[-1]} ({r.kind})",
                  "x".join(map(str, r.output_shape)) if r.output_shape else "-", f"{r.params:,}", f"{r.macs:,}")
                 for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(header))
        mib = lambda n: f"{n / 2**20:.2f}"  # noqa: E731
        totals = [
            f"Input shape: {'x'.join(map(str, self.input_shape))}",
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.total_params - self.trainable_params:,}",
            f"Total MACs: {format_count(self.total_macs)}",
            f"Input size (MiB): {mib(self.input_bytes)}",
            f"Forward/backward pass size (MiB, estimate): {mib(self.activation_bytes)}",
            f"Params size (MiB): {mib(self.param_bytes)}",
            f"Estimated total size (MiB): {mib(self.total_bytes)}",
        ]
        return "\n".join([self.title, rule, fmt(header), rule, *map(fmt, table), rule, *totals, rule])


def summary(model: nn.Module, img_size: int = 224, in_chans: int | None = None, batch_size: int = 1,
            device: str | torch.device | None = None, depth: int = 3) -> ModelSummary:
    """Run one forward pass of a random ``batch_size x in_chans x img_size x img_size`` batch in eval mode and
    tabulate the modules up to ``depth`` levels deep (attention layers count as one layer).

    A module's parameters and MACs include those of its children; the totals cover the whole model and
    the whole batch. ``in_chans`` defaults to the input channels of the model's first convolution.
    The model is moved to ``device`` when one is given; it stays in the mode it was in.
    """
    if device is not None:
        model = model.to(device)
    if in_chans is None:
        first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_chans = first_conv.in_channels if first_conv is not None else 3
    first = next(model.parameters(), None)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=first.device if first is not None else device)
    shown = {}
    skip_below: list[str] = []  # attention modules (excite names them "attn"): their children are not listed
    for name, module in model.named_modules():
        level = name.count(".") + 1
        if not name or level > depth or any(name.startswith(f"{p}.") for p in skip_below):
            continue
        shown[module] = name
        if name.rsplit(".", 1)[-1] == "attn":
            skip_below.append(name)

    rows: dict[str, LayerRow] = {}

    def record(module: nn.Module, _inputs, output) -> None:
        name = shown[module]
        if name not in rows:  # a module called twice (a shared ReLU) keeps its first call
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            params = sum(p.numel() for p in module.parameters())
            rows[name] = LayerRow(name, name.count(".") + 1, type(module).__name__, shape, params, 0)

    # Rows follow the first call of each module; pre-hooks fire before the children's (unlike forward hooks).
    order: dict[str, int] = {}

    def start(module: nn.Module, _inputs) -> None:
        order.setdefault(shown[module], len(order))

    activation_bytes = [0]

    def count_output(_module: nn.Module, _inputs, output) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        activation_bytes[0] += 2 * sum(t.numel() * t.element_size() for t in outputs if isinstance(t, torch.Tensor))

    leaves = [m for m in model.modules() if next(m.children(), None) is None and next(m.parameters(), None) is not None]
    handles = [h for m in shown for h in (m.register_forward_pre_hook(start), m.register_forward_hook(record))]
    handles += [m.register_forward_hook(count_output) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    flops = counter.get_flop_counts()
    root = type(model).__name__
    for row in rows.values():
        row.macs = sum(flops.get(f"{root}.{row.name}", {}).values()) // 2
    params = list(model.parameters())
    return ModelSummary(
        title=getattr(model, "model_name", root),
        rows=sorted(rows.values(), key=lambda r: order[r.name]),
        input_shape=tuple(x.shape),
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_macs=counter.get_total_flops() // 2,
        input_bytes=x.numel() * x.element_size(),
        param_bytes=sum(p.numel() * p.element_size() for p in params),
        activation_bytes=activation_bytes[0],
    )
