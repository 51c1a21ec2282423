"""Model families, the registry that names them, weight loading and the layer summary."""
from excite.models import densenet, dpn, resdense, resnet  # noqa: F401  (registers the builders)
from excite.models._base import ClassifierModel
from excite.models._registry import create_model, list_models, register_model
from excite.models.densenet import DenseNet
from excite.models.dpn import DPN
from excite.models.resdense import ResDense
from excite.models.resnet import ResNet
from excite.models.summary import ModelSummary, summary
from excite.models.weights import LoadReport, load_weights

__all__ = [
    "ClassifierModel", "DPN", "DenseNet", "LoadReport", "ModelSummary", "ResDense", "ResNet", "create_model",
    "list_models", "load_weights", "register_model", "summary",
]
