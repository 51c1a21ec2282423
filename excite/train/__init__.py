"""Training: the config dataclass, the loop and ``fit``.

Imported on first use: the config and recipes (``excite.train.config``, ``excite.train.recipes``) load
without torch, so the CLI builds its parser without it.
"""
from excite._lazy import lazy_exports

__all__ = ["RunResult", "TrainConfig", "fit", "resolve_config", "resume_config"]

lazy_exports(__name__, {
    "RunResult": "excite.train.fit",
    "TrainConfig": "excite.train.config",
    "fit": "excite.train.fit",
    "resolve_config": "excite.train.config",
    "resume_config": "excite.train.fit",
})
