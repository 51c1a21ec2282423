"""excite: build, train, measure and compare channel-attention and densely connected CNN classifiers."""
from excite.models import create_model, list_models, load_weights, summary
from excite.train import RunResult, TrainConfig, fit, resume_config

__version__ = "0.1.0"

__all__ = ["RunResult", "TrainConfig", "create_model", "fit", "list_models", "load_weights", "resume_config",
           "summary", "__version__"]
