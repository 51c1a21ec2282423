"""Building blocks shared by every model family."""
from excite.nn.attention import (
    ATTENTION_LAYERS,
    CBAM,
    EfficientChannelAttention,
    SqueezeExcite,
    create_attn,
    get_attn,
)
from excite.nn.fold import fold_batchnorm

__all__ = [
    "ATTENTION_LAYERS", "CBAM", "EfficientChannelAttention", "SqueezeExcite", "create_attn", "fold_batchnorm",
    "get_attn",
]
