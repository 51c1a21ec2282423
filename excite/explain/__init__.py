"""Explaining a trained model: where it looks (class-activation maps, :mod:`excite.explain.cam`) and what its
attention layers learned (gate statistics per class and depth, :mod:`excite.explain.excitation`).

Both return arrays, so a notebook can plot them its own way; ``excite explain`` and ``excite excitation`` write
figures and an HTML page.
"""
from excite.explain.cam import cam, default_target_layer, explain_images, overlay
from excite.explain.excitation import (
    ExcitationStats,
    LayerExcitation,
    NoAttention,
    attention_layers,
    excitation_stats,
    replaced_gate_accuracy,
)

__all__ = ["ExcitationStats", "LayerExcitation", "NoAttention", "attention_layers", "cam", "default_target_layer",
           "excitation_stats", "explain_images", "overlay", "replaced_gate_accuracy"]
