"""excite: build, train, measure and compare channel-attention and densely connected CNN classifiers."""
from excite.models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "__version__"]
