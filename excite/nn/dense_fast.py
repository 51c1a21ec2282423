"""A leaner DenseNet block: one buffer per block instead of a concatenation per layer.

The plain :class:`~excite.nn.dense.DenseBlock` concatenates every earlier feature map before each
layer, so a block of L layers copies O(L^2) channels, and autograd keeps each concatenation and its
BN-ReLU output for the backward pass. :class:`FastDenseBlock` allocates the block's output once; each
layer reads its input as a channel prefix of that buffer and writes its new features after it. The
BN-ReLU-Conv1x1 bottleneck over the prefix is a custom autograd Function that saves only the batch
statistics and recomputes BN-ReLU in backward (the memory-efficient DenseNet of Pleiss et al., 2017);
the layer's BN-ReLU-Conv3x3 after it does the same, keeping its input but not its BN-ReLU output.

The block has the same parameters, buffers and state-dict keys as the plain one and computes the same
function (running statistics included), so weights interchange and :func:`make_fast` converts a built
model in place.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from excite.nn.dense import DenseBlock


def _norm_relu_conv(x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, running_mean: torch.Tensor,
                    running_var: torch.Tensor, conv_weight: torch.Tensor, momentum: float, eps: float,
                    padding: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode ``conv(relu(batch_norm(x)))`` without autograd; also returns the batch mean and
    inverse standard deviation, all that backward needs besides ``x`` to recompute the rest."""
    # Compute in x's dtype (bf16 under autocast) and cast the weight as autocast would.
    with torch.autocast(x.device.type, enabled=False):
        hidden, mean, invstd = torch.ops.aten.native_batch_norm(
            x, norm_weight, norm_bias, running_mean, running_var, True, momentum, eps)
        return F.conv2d(hidden.relu_(), conv_weight.to(hidden.dtype), padding=padding), mean, invstd


def _norm_relu_conv_backward(grad_out: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor,
                             norm_bias: torch.Tensor, conv_weight: torch.Tensor, mean: torch.Tensor,
                             invstd: torch.Tensor, eps: float, padding: int) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`_norm_relu_conv` for x, the norm's weight and bias and the conv weight, with the
    BN-ReLU output recomputed from ``x`` and the saved batch statistics."""
    scale = norm_weight * invstd
    shift = norm_bias - mean * scale
    hidden = torch.addcmul(shift[:, None, None], x, scale[:, None, None]).relu_().to(x.dtype)
    grad_hidden, grad_conv, _ = torch.ops.aten.convolution_backward(
        grad_out, hidden, conv_weight.to(hidden.dtype), None, [1, 1], [padding, padding], [1, 1], False, [0, 0], 1,
        [True, True, False])
    grad_hidden = torch.ops.aten.threshold_backward(grad_hidden, hidden, 0)  # ReLU's backward
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        grad_hidden, x, norm_weight, None, None, mean, invstd, True, eps, [True, True, True])
    return grad_x, grad_weight, grad_bias, grad_conv


class _Bottleneck(torch.autograd.Function):
    """Training-mode ``conv1(relu(norm1(buffer[:, :channels])))``, where ``features`` fill those channels.

    ``features`` are the differentiable inputs (their gradients are the split of the prefix's
    gradient); ``buffer`` only carries their values, so later layers may write its other channels.
    """

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, channels: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                running_mean: torch.Tensor, running_var: torch.Tensor, conv_weight: torch.Tensor,
                momentum: float, eps: float, *features: torch.Tensor) -> torch.Tensor:
        out, mean, invstd = _norm_relu_conv(buffer[:, :channels], norm_weight, norm_bias, running_mean,
                                            running_var, conv_weight, momentum, eps, padding=0)
        ctx.buffer = buffer  # not save_for_backward: later layers write its other channels in place
        ctx.sizes, ctx.eps = [f.shape[1] for f in features], eps
        ctx.save_for_backward(norm_weight, norm_bias, conv_weight, mean, invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        norm_weight, norm_bias, conv_weight, mean, invstd = ctx.saved_tensors
        # A dense copy of the prefix: the batch-norm backward kernels are much slower on a strided view.
        x = ctx.buffer[:, :sum(ctx.sizes)].contiguous(memory_format=_memory_format(ctx.buffer))
        grad_x, grad_weight, grad_bias, grad_conv = _norm_relu_conv_backward(
            grad_out, x, norm_weight, norm_bias, conv_weight, mean, invstd, ctx.eps, padding=0)
        return (None, None, grad_weight, grad_bias, None, None, grad_conv, None, None,
                *grad_x.split(ctx.sizes, 1))


class _NormReluConv(torch.autograd.Function):
    """Training-mode ``conv(relu(norm(x)))`` (a dense layer's BN-ReLU-Conv3x3) that keeps only ``x`` and the
    batch statistics for backward, where the BN-ReLU output is recomputed, instead of that output too."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor, running_mean: torch.Tensor,
                running_var: torch.Tensor, conv_weight: torch.Tensor, momentum: float, eps: float,
                padding: int) -> torch.Tensor:
        out, mean, invstd = _norm_relu_conv(x, norm_weight, norm_bias, running_mean, running_var, conv_weight,
                                            momentum, eps, padding)
        ctx.eps, ctx.padding = eps, padding
        ctx.save_for_backward(x, norm_weight, norm_bias, conv_weight, mean, invstd)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        x, norm_weight, norm_bias, conv_weight, mean, invstd = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, grad_conv = _norm_relu_conv_backward(
            grad_out, x, norm_weight, norm_bias, conv_weight, mean, invstd, ctx.eps, ctx.padding)
        return grad_x, grad_weight, grad_bias, None, None, grad_conv, None, None, None


class _BlockOutput(torch.autograd.Function):
    """``torch.cat(features, 1)`` whose result is ``buffer``, already filled with them: no copy forward,
    a split of the gradient backward."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        ctx.sizes = [f.shape[1] for f in features]
        # Saved only for autograd's version check: an in-place change of the block's output would
        # otherwise go unnoticed by the layers' backward, which reads the buffer.
        ctx.save_for_backward(buffer)
        return buffer

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        _ = ctx.saved_tensors  # unpacking is what runs the version check
        return (None, *grad.split(ctx.sizes, 1))


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _momentum(norm: nn.BatchNorm2d) -> float:
    """Count the batch in ``num_batches_tracked`` and return the running-stat momentum, as BatchNorm2d does."""
    norm.num_batches_tracked.add_(1)
    return 1.0 / float(norm.num_batches_tracked) if norm.momentum is None else norm.momentum


class FastDenseBlock(DenseBlock):
    """A :class:`DenseBlock` whose layers share one pre-allocated output buffer in training; same function,
    same weights.

    Eval mode takes the plain path: inference keeps no activations for backward, so there is little
    memory to save, and on a CPU batch norm over a strided view of the buffer costs more than the
    concatenation it replaces. Layers without a bottleneck (``bn_size=0``) take it too, and so does
    a block inside ``torch.compile``: Inductor's code for the buffer writes gave other outputs than eager
    mode (on CPU, torch 2.14), while it fuses the plain block's concatenations by itself.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = [m for name, m in self.named_children() if name.startswith("denselayer")]
        if layers[0].bn_size == 0 or not self.training or torch.compiler.is_compiling():
            return super().forward(x)
        buffer = torch.empty((x.shape[0], self.out_channels, *x.shape[2:]), dtype=x.dtype, device=x.device,
                             memory_format=_memory_format(x))
        features = [x]
        filled = x.shape[1]
        with torch.no_grad():
            buffer[:, :filled] = x
        for layer in layers:
            norm = layer.norm1
            hidden = _Bottleneck.apply(buffer, filled, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                       layer.conv1.weight, _momentum(norm), norm.eps, *features)
            norm, conv = layer.norm2, layer.conv2
            new = layer.finish(_NormReluConv.apply(hidden, norm.weight, norm.bias, norm.running_mean, norm.running_var,
                                                   conv.weight, _momentum(norm), norm.eps, conv.padding[0]))
            with torch.no_grad():
                buffer[:, filled:filled + new.shape[1]] = new
            features.append(new)
            filled += new.shape[1]
        return self.attn(_BlockOutput.apply(buffer, *features))


def make_fast(model: nn.Module) -> nn.Module:
    """Switch every plain :class:`DenseBlock` in ``model`` to :class:`FastDenseBlock`, in place.

    Only the class changes: parameters, buffers and state-dict keys stay, so a checkpoint of either
    loads into the other. Returns ``model``.
    """
    for module in model.modules():
        if type(module) is DenseBlock:
            module.__class__ = FastDenseBlock
    return model
