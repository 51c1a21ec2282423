"""The registered model names, readable without importing torch, so that ``excite models`` starts at once.

Sorted as :func:`excite.models.list_models` returns them; tests/test_models.py checks that the two are
exactly equal, so a builder added to the registry must be added here too.
"""

MODEL_NAMES: tuple[str, ...] = (
    "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_bc_100", "densenet_bc_190", "densenet_bc_250",
    "dpn68", "dpn92",
    "resdense_j4",
    "resnet101", "resnet110_cifar", "resnet152", "resnet164_cifar", "resnet18", "resnet18_cifar", "resnet20_cifar",
    "resnet34", "resnet50", "resnet56_cifar",
    "se_densenet121", "se_densenet169", "se_densenet201", "se_densenet_bc_100",
    "se_resnet101", "se_resnet110_cifar", "se_resnet152", "se_resnet164_cifar", "se_resnet18", "se_resnet18_cifar",
    "se_resnet20_cifar", "se_resnet34", "se_resnet50", "se_resnet56_cifar",
)
