"""Training: the config dataclass, the loop and ``fit``."""
from excite.train.config import TrainConfig, resolve_config
from excite.train.fit import RunResult, fit, resume_config

__all__ = ["RunResult", "TrainConfig", "fit", "resolve_config", "resume_config"]
