"""Model families, the registry that names them, weight loading and the layer summary.

Imported on first use: ``excite.models.names`` (the registered names, for ``excite models``) loads
without torch.
"""
from excite._lazy import lazy_exports

__all__ = [
    "ClassifierModel", "DPN", "DenseNet", "LoadReport", "ModelSummary", "ResDense", "ResNet", "create_model",
    "list_models", "load_weights", "register_model", "summary",
]

lazy_exports(__name__, {
    "ClassifierModel": "excite.models._base",
    "DPN": "excite.models.dpn",
    "DenseNet": "excite.models.densenet",
    "LoadReport": "excite.models.weights",
    "ModelSummary": "excite.models.summary",
    "ResDense": "excite.models.resdense",
    "ResNet": "excite.models.resnet",
    "create_model": "excite.models._registry",
    "list_models": "excite.models._registry",
    "load_weights": "excite.models.weights",
    "register_model": "excite.models._registry",
    "summary": "excite.models.summary",
})
