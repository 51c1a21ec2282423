"""excite: build, train, measure and compare channel-attention and densely connected CNN classifiers."""
__version__ = "0.1.0"  # before the imports below: excite.environment reads it while they run

from excite.models import create_model, list_models, load_weights, summary  # noqa: E402
from excite.train import RunResult, TrainConfig, fit, resume_config  # noqa: E402

__all__ = ["RunResult", "TrainConfig", "create_model", "fit", "list_models", "load_weights", "resume_config",
           "summary", "__version__"]
