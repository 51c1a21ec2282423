"""Building blocks shared by every model family."""
from excite.nn.attention import (
    ATTENTION_LAYERS,
    CBAM,
    EfficientChannelAttention,
    SqueezeExcite,
    create_attn,
    get_attn,
)

__all__ = ["ATTENTION_LAYERS", "CBAM", "EfficientChannelAttention", "SqueezeExcite", "create_attn", "get_attn"]
