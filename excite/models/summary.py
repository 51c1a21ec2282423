"""A torchinfo-like layer table: output shape, parameters and multiply-accumulates of every layer.

MACs come from :class:`torch.utils.flop_counter.FlopCounterMode` (one MAC = two FLOPs), which counts
the matrix products and convolutions that dominate a CNN's cost; element-wise ops count as zero.
"""
from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ModelSummary:
    """The result of :func:`summary`; ``str()`` renders the table and the totals."""

    title: str
    rows: list[LayerRow]
    input_shape: tuple[int, ...]
    total_params: int
    trainable_params: int
    total_macs: int
    input_bytes: int
    param_bytes: int

    def __str__(self) -> str:
        header = ("Layer (type)", "Output shape", "Param #", "MACs")
        table = [(f"{'  ' * (r.depth - 1)}{r.name.rsplit('.', 1)[-1]} ({r.kind})",
                  "x".join(map(str, r.output_shape)) if r.output_shape else "-", f"{r.params:,}", f"{r.macs:,}")
                 for r in self.rows]
        widths = [max(len(row[i]) for row in [header, *table]) for i in range(4)]
        fmt = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(row, widths)))
        rule = "-" * len(fmt(header))
        mb = 2 ** 20
        totals = [
            f"Input shape: {'x'.join(map(str, self.input_shape))}",
            f"Total params: {self.total_params:,}",
            f"Trainable params: {self.trainable_params:,}",
            f"Non-trainable params: {self.total_params - self.trainable_params:,}",
            f"Total MACs: {self.total_macs / 1e9:.2f} G",
            f"Input size (MB): {self.input_bytes / mb:.2f}",
            f"Params size (MB): {self.param_bytes / mb:.2f}",
        ]
        return "\n".join([self.title, rule, fmt(header), rule, *map(fmt, table), rule, *totals, rule])


def summary(model: nn.Module, img_size: int = 224, in_chans: int = 3, batch_size: int = 1, device: str = "cpu",
            depth: int = 3) -> ModelSummary:
    """Run one forward pass of a random ``batch_size x in_chans x img_size x img_size`` batch in eval mode and
    tabulate the modules up to ``depth`` levels deep (attention layers count as one layer).

    A module's parameters and MACs include those of its children; the totals cover the whole model.
    The model is moved to ``device``.
    """
    model = model.to(device)
    x = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
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

    handles = [h for m in shown for h in (m.register_forward_pre_hook(start), m.register_forward_hook(record))]
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
    )
