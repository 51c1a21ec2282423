"""Model families and the registry that names them."""
from excite.models import densenet, resnet  # noqa: F401  (registers the builders)
from excite.models._base import ClassifierModel
from excite.models._registry import create_model, list_models, register_model
from excite.models.densenet import DenseNet
from excite.models.resnet import ResNet

__all__ = ["ClassifierModel", "DenseNet", "ResNet", "create_model", "list_models", "register_model"]
