"""excite: build, train, measure and compare channel-attention and densely connected CNN classifiers.

The API is imported on first use, so that ``import excite`` and the CLI's light commands (``excite
--version``, ``excite models``) start without importing torch.
"""
from excite._lazy import lazy_exports

__version__ = "0.1.0"

__all__ = ["RunResult", "TrainConfig", "create_model", "fit", "list_models", "load_weights", "resume_config",
           "summary", "__version__"]

lazy_exports(__name__, {
    "create_model": "excite.models",
    "list_models": "excite.models",
    "load_weights": "excite.models",
    "summary": "excite.models",
    "RunResult": "excite.train.fit",
    "TrainConfig": "excite.train.config",
    "fit": "excite.train.fit",
    "resume_config": "excite.train.fit",
})
